"""Group commit for async submissions: many concurrent `POST .../async_predict` share one transaction.

One INSERT transaction per request made the store's commit (an fsync on PostgreSQL, a WAL write and lock
hand-over on SQLite) and a thread hop the cost of every submission, and concurrent SQLite writers slept in
the busy handler. Here submissions that arrive while a commit is running wait for the next one, which takes
them all (up to `max_batch`); each caller is answered only after the transaction holding its row committed,
so a 201 still means the request is durable.
"""

from __future__ import annotations

import asyncio

from ballast.control.async_queue import AsyncQueue, Submission
from ballast.control.errors import ControlError

MAX_BATCH = 512

Pending = tuple[Submission, "asyncio.Future[str | ControlError]"]


class SubmitBatcher:
    """One writer (a task running `AsyncQueue.submit_many` off the event loop) for every submission."""

    def __init__(self, queue: AsyncQueue, max_batch: int = MAX_BATCH):
        self.queue = queue
        self.max_batch = max_batch
        self._pending: list[Pending] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, sub: Submission) -> str:
        """The new request's id once its row is committed; ControlError (429) when its queue is full."""
        fut: asyncio.Future[str | ControlError] = asyncio.get_running_loop().create_future()
        self._pending.append((sub, fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        out = await fut  # a caller that goes away leaves its row in the commit (`_write` skips a done future)
        if isinstance(out, ControlError):
            raise out
        return out

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            try:
                results = await asyncio.to_thread(self.queue.submit_many, [s for s, _ in batch])
            except Exception as e:  # the store failed: every caller of this transaction gets the error
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)
