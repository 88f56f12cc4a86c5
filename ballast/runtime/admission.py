"""Admission control: at most `predict_concurrency` requests run, at most `max_queue` wait, most important first.

A request's priority is the `x-ballast-priority` the platform sets (interactive traffic sends none: 0; async
requests 1..3, batch lines 4; lower runs first). Waiters are admitted by priority, first come first served
within one, and queued async or batch work never holds a place an interactive request needs: when the queue
is full, a more important arrival takes the place of the newest of the least important waiters, which is
refused with a 429 (the platform's dispatcher puts it back in its durable queue).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

from ballast.openai import APIError
from ballast.runtime.metrics import RuntimeMetrics

Waiter = tuple[int, int, "asyncio.Future[None]"]  # (priority, arrival number, future)


class Admission:
    """A priority semaphore with a bounded wait queue; a full queue is a 429 with Retry-After."""

    def __init__(self, concurrency: int, max_queue: int, metrics: RuntimeMetrics | None = None):
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.running = 0
        self._waiters: list[Waiter] = []  # a heap: the most important, oldest waiter first
        self._arrivals = itertools.count()
        self._metrics = metrics
        if metrics is not None:  # read when scraped, not written on every request
            metrics.in_flight.set_function(lambda: self.running)
            metrics.queued.set_function(lambda: len(self._waiters))

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, priority: int = 0) -> None:
        if self.running < self.concurrency and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.max_queue and not self._displace(priority):
            self._count("queue_full")
            raise self._full()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (priority, next(self._arrivals), fut)
        heapq.heappush(self._waiters, entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                if fut.exception() is None:
                    self.release()  # we were handed a slot just as we were cancelled: pass it on
            elif entry in self._waiters:  # still waiting (a displaced waiter was taken out already)
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            raise

    def _displace(self, priority: int) -> bool:
        """Make room for a request of `priority` by refusing the newest of the least important waiters, if they
        are less important than it."""
        if not self._waiters:
            return False
        worst = max(self._waiters, key=lambda w: (w[0], w[1]))
        if worst[0] <= priority:
            return False
        self._waiters.remove(worst)
        heapq.heapify(self._waiters)
        worst[2].set_exception(self._full("a more important request took its place in the queue"))
        self._count("displaced")
        return True

    def _full(self, why: str = "") -> APIError:
        return APIError(
            429,
            f"the replica is at capacity ({self.running} running, {len(self._waiters)} queued"
            f"{'; ' + why if why else ''}); retry shortly",
            code="queue_full",
            headers={"Retry-After": "1"},
        )

    def _count(self, reason: str) -> None:
        if self._metrics:
            self._metrics.rejected.labels(reason).inc()

    def release(self) -> None:
        while self._waiters:
            fut = heapq.heappop(self._waiters)[2]
            if not fut.done():
                fut.set_result(None)  # the slot moves to the waiter; `running` is unchanged
                return
        self.running -= 1
