"""One request never takes the engine down; a dead or stuck engine says so; prefix-cache digests;
sampling defaults from generation_config.json and the package."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import pytest

from ballast.engine import LLM, AsyncEngine, EngineArgs, EngineError, EngineInternalError, SamplingParams
from ballast.engine.block_manager import BlockManager
from ballast.engine.sequence import Sequence
from tests.engine.conftest import assert_no_leaks

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def test_a_failing_request_fails_alone_and_the_engine_goes_on(tiny):
    llm = LLM(str(tiny), kv_cache_bytes=16 << 20)
    eng = llm.engine
    bad = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    bad.logprobs = 10**6  # past validation: top-k of more than the vocabulary raises while appending its token
    eng.add_request("bad", list(range(3, 20)), bad)
    eng.add_request("good", list(range(5, 30)), GREEDY)
    errors, finished = {}, {}
    while eng.has_work():
        for out in eng.step():
            if out.error:
                errors[out.request_id] = out
            elif out.finished:
                finished[out.request_id] = out
    assert set(errors) == {"bad"} and "bad" in errors["bad"].error and errors["bad"].error_code is None
    assert set(finished) == {"good"}
    assert_no_leaks(llm)
    # A huge seed is folded into torch's range rather than crashing (the API edge refuses it first).
    out = llm.generate([list(range(3, 9))], SamplingParams(max_tokens=4, temperature=1.0, seed=2**70))[0]
    assert out.error is None and len(out.outputs[0].token_ids) == 4


def test_a_request_that_breaks_batched_sampling_fails_alone(tiny):
    llm = LLM(str(tiny), kv_cache_bytes=16 << 20)
    eng = llm.engine
    # A penalty this small turns the seen tokens' logits into inf: its distribution is NaN, so the batched
    # draw raises; the runner then samples row by row and only this request fails.
    eng.add_request("nan", list(range(3, 20)), SamplingParams(max_tokens=8, temperature=1.0, seed=1,
                                                              repetition_penalty=1e-300, ignore_eos=True))
    eng.add_request("fine", list(range(3, 20)), SamplingParams(max_tokens=8, temperature=1.0, seed=2,
                                                               ignore_eos=True))
    results = {}
    while eng.has_work():
        for out in eng.step():
            if out.finished:
                results[out.request_id] = out
    assert results["nan"].error and "nan" in results["nan"].error
    assert results["fine"].error is None
    assert_no_leaks(llm)


def test_async_engine_survives_a_request_that_breaks_and_reports_a_dead_thread(tiny):
    async def run() -> None:
        eng = AsyncEngine(EngineArgs(str(tiny), kv_cache_bytes=16 << 20))
        await eng.start()
        broken = SamplingParams(max_tokens=4, temperature=1.0)
        broken.seed = 1.5  # type: ignore[assignment]  # torch refuses it when the sequence is built
        with pytest.raises(EngineInternalError, match="broken"):
            async for _ in eng.add_request("broken", [3, 4, 5], broken):
                pass
        outs = [o async for o in eng.add_request("after", [3, 4, 5], GREEDY)]
        assert outs[-1].finished and eng.health() == (True, None)
        # Stuck: work is waiting and the thread has not come round for longer than stall_timeout_s.
        gen = eng.add_request("long", list(range(3, 40)), SamplingParams(max_tokens=400, ignore_eos=True))
        await gen.__anext__()
        ok, why = eng.health(now=time.monotonic() + eng.stall_timeout_s + 1)
        assert not ok and "stuck" in why
        await gen.aclose()
        # Dead: whatever kills the thread marks the engine down; waiting callers get an error, not a hang.
        waiting = eng.add_request("waiting", list(range(3, 40)), SamplingParams(max_tokens=400, ignore_eos=True))
        eng._commands.put(("add", None))  # a malformed command: the thread dies unpacking it
        eng._wake.set()
        with pytest.raises(EngineInternalError):
            async with asyncio.timeout(30):
                async for _ in waiting:
                    pass
        ok, why = eng.health()
        assert not ok and "died" in why
        with pytest.raises(EngineInternalError):
            eng.add_request("late", [3, 4], GREEDY)
        await eng.shutdown()

    asyncio.run(run())


def test_prefix_cache_digests_never_collide_and_shared_prefixes_hit():
    bm = BlockManager(num_blocks=64, block_size=4)
    params = SamplingParams(max_tokens=1)

    def admit(ids: list[int]) -> tuple[Sequence, int]:
        seq = Sequence("r", 0, ids, params, 0, 1000)
        cached = bm.match_prefix(seq)
        assert bm.allocate(seq, len(ids))
        seq.num_computed = len(ids)
        bm.register_full_blocks(seq)
        return seq, cached

    a, _ = admit([1, 2, 3, 4, 5, 6, 7, 8, 9])
    b, cached = admit([1, 2, 3, 4, 5, 6, 7, 8, 10])  # same two full blocks: both hit
    assert cached == 8 and b.block_table[:2] == a.block_table[:2]
    # Different token sequences (including ones a tuple hash mixes up, -1 vs -2) never share a block.
    c, cached = admit([-1, 2, 3, 4, 9])
    d, cached2 = admit([-2, 2, 3, 4, 9])
    assert cached == cached2 == 0 and c.block_table[0] != d.block_table[0]
    assert hash(-1) == hash(-2) and c.block_hashes[0] != d.block_hashes[0]
    e, cached = admit([5, 6, 7, 8, 9])  # a block equal to a's second, under a different parent: no hit
    assert cached == 0 and e.block_hashes[0] != a.block_hashes[1]
    assert len(set(bm.hash_to_block)) == len(bm.hash_to_block.values())


def test_sampling_defaults_from_generation_config_and_package(tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny, ckpt)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    gen.update(temperature=0.0, top_k=7, max_new_tokens=5, do_sample=False)
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(str(ckpt), kv_cache_bytes=16 << 20, max_model_len=64, default_sampling={"top_p": 0.5})
    eng = llm.engine
    params = eng.sampling_params(seed=None, temperature=None, top_k=3)
    assert (params.temperature, params.top_k, params.top_p, params.max_tokens) == (0.0, 3, 0.5, None)
    assert eng.default_max_tokens == 5
    out = llm.generate([[3, 4, 5]], eng.sampling_params(ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5  # the checkpoint's max_new_tokens bounds it
    # Without a max_tokens anywhere the bound is the context left, not a runaway generation.
    plain = LLM(str(tiny), kv_cache_bytes=16 << 20, max_model_len=32, default_max_tokens=1024)
    out = plain.generate([list(range(3, 23))], plain.engine.sampling_params(temperature=0.0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 12 and out.outputs[0].finish_reason == "length"
    with pytest.raises(EngineError) as e:
        plain.generate([list(range(3, 23))], SamplingParams(max_tokens=13))
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
