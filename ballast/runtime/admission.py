"""Admission control: at most `predict_concurrency` requests run, at most `max_queue` wait."""

from __future__ import annotations

import asyncio
from collections import deque

from ballast.openai import APIError
from ballast.runtime.metrics import RuntimeMetrics


class Admission:
    """A FIFO semaphore with a bounded wait queue; a full queue is a 429 with Retry-After."""

    def __init__(self, concurrency: int, max_queue: int, metrics: RuntimeMetrics | None = None):
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._metrics = metrics
        if metrics is not None:  # read when scraped, not written on every request
            metrics.in_flight.set_function(lambda: self.running)
            metrics.queued.set_function(lambda: len(self._waiters))

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.running < self.concurrency and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.max_queue:
            if self._metrics:
                self._metrics.rejected.labels("queue_full").inc()
            raise APIError(
                429,
                f"the replica is at capacity ({self.running} running, {len(self._waiters)} queued); retry shortly",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # we were handed a slot just as we were cancelled: pass it on
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves to the waiter; `running` is unchanged
                return
        self.running -= 1
