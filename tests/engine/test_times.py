"""The engine records each request's phases (queued, first scheduled, first token, finished) as plain timestamps
in its own thread, for the replica's trace spans; only the finished output carries them."""

from __future__ import annotations

import asyncio
import time

from ballast.engine import AsyncEngine, EngineArgs, SamplingParams


def test_phases_are_recorded_in_order_on_the_finished_output(tiny):
    async def run() -> tuple[list, list, int, int]:
        eng = AsyncEngine(EngineArgs(str(tiny), kv_cache_bytes=16 << 20, max_num_seqs=1))
        await eng.start()
        before = time.time_ns()
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        # max_num_seqs=1: the second request waits in the queue while the first decodes.
        first, second = (eng.add_request(rid, list(range(3, 30)), params) for rid in ("a", "b"))
        outs_a, outs_b = await asyncio.gather(_all(first), _all(second))
        after = time.time_ns()
        await eng.shutdown()
        return outs_a, outs_b, before, after

    outs_a, outs_b, before, after = asyncio.run(run())
    for outs in (outs_a, outs_b):
        assert all(o.times is None for o in outs[:-1]) and outs[-1].finished
        t = outs[-1].times
        assert before <= t.queued_ns <= t.scheduled_ns <= t.first_token_ns <= t.finished_ns <= after
    a, b = outs_a[-1].times, outs_b[-1].times
    assert b.scheduled_ns >= a.finished_ns  # the second was scheduled only once the first had finished
    assert b.scheduled_ns - b.queued_ns > a.scheduled_ns - a.queued_ns  # so it waited longer in the queue


async def _all(gen) -> list:
    return [o async for o in gen]
