"""The replica's admission queue: priorities decide who is admitted next, and queued async or batch work never
holds a place an interactive request needs (the real `Admission`, driven by real asyncio tasks)."""

from __future__ import annotations

import asyncio

import pytest

from ballast.openai import APIError
from ballast.runtime.admission import Admission


async def _held(adm: Admission, prio: int, order: list[str], name: str, gate: asyncio.Event) -> None:
    await adm.acquire(prio)
    order.append(name)
    await gate.wait()
    adm.release()


def test_waiters_are_admitted_by_priority_then_arrival() -> None:
    async def main() -> list[str]:
        adm = Admission(concurrency=1, max_queue=10)
        order: list[str] = []
        gate = asyncio.Event()
        first = asyncio.create_task(_held(adm, 0, order, "running", gate))
        await asyncio.sleep(0)
        tasks = [asyncio.create_task(_held(adm, p, order, n, gate))
                 for p, n in ((4, "batch"), (2, "async-1"), (0, "interactive-a"), (1, "async-0"), (0, "interactive-b"))]
        await asyncio.sleep(0)
        assert adm.waiting == 5 and adm.running == 1
        gate.set()
        await asyncio.wait_for(asyncio.gather(first, *tasks), 10)
        assert adm.running == 0 and adm.waiting == 0
        return order

    assert asyncio.run(main()) == ["running", "interactive-a", "interactive-b", "async-0", "async-1", "batch"]


def test_a_full_queue_refuses_queued_work_before_interactive_requests() -> None:
    async def main() -> None:
        adm = Admission(concurrency=1, max_queue=2)
        gate = asyncio.Event()
        order: list[str] = []
        running = asyncio.create_task(_held(adm, 0, order, "running", gate))
        await asyncio.sleep(0)
        batch = [asyncio.create_task(_held(adm, 4, order, f"batch-{i}", gate)) for i in range(2)]
        await asyncio.sleep(0)
        assert adm.waiting == 2
        # The queue is full of batch lines: an interactive request takes the newest one's place ...
        inter = asyncio.create_task(_held(adm, 0, order, "interactive", gate))
        await asyncio.sleep(0)
        with pytest.raises(APIError) as e:
            await asyncio.wait_for(batch[1], 10)
        assert e.value.status == 429 and e.value.code == "queue_full" and e.value.headers.get("Retry-After")
        # ... another batch line finds no place, nor does an interactive request once only equals wait.
        with pytest.raises(APIError):
            await adm.acquire(4)
        more = asyncio.create_task(_held(adm, 0, order, "interactive-2", gate))
        await asyncio.sleep(0)
        with pytest.raises(APIError):
            await asyncio.wait_for(batch[0], 10)
        assert adm.waiting == 2
        with pytest.raises(APIError):
            await adm.acquire(0)
        gate.set()
        await asyncio.wait_for(asyncio.gather(running, inter, more), 10)
        assert order == ["running", "interactive", "interactive-2"] and adm.running == 0

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_no_trace() -> None:
    async def main() -> None:
        adm = Admission(concurrency=1, max_queue=4)
        await adm.acquire(0)
        waiter = asyncio.create_task(adm.acquire(4))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert adm.waiting == 0
        adm.release()
        assert adm.running == 0
        await asyncio.wait_for(adm.acquire(2), 10)
        assert adm.running == 1

    asyncio.run(main())
