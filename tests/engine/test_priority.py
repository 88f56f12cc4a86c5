"""Priorities in the scheduler: more important work takes slots and KV blocks from less important work by
preemption (recompute), and every output stays exactly what it would be without any preemption."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from ballast.engine import LLM, PRIORITY_BATCH, PRIORITY_INTERACTIVE, EngineError, SamplingParams
from tests.engine.conftest import assert_no_leaks, hf_greedy

LOW = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, priority=PRIORITY_BATCH)
HIGH = replace(LOW, priority=PRIORITY_INTERACTIVE, max_tokens=8)


def prompt(llm: LLM, seed: int, length: int = 20) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, llm.engine.model_config.vocab_size) for _ in range(length)]


def run(llm: LLM, low: list[list[int]], high: list[int], low_steps: int) -> dict[str, list[int]]:
    """Start the low-priority prompts, step `low_steps` times, then add the high one; run to the end.
    Returns each request's generated ids and records which finished first."""
    eng = llm.engine
    for i, p in enumerate(low):
        eng.add_request(f"low{i}", p, LOW)
    got: dict[str, list[int]] = {}
    order: list[str] = []
    steps = 0
    while eng.has_work():
        if steps == low_steps:
            assert len(eng.scheduler.running) == len(low)  # the low-priority work is mid-decode
            eng.add_request("high", high, HIGH)
        steps += 1
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.outputs[0].token_ids if out.outputs else [])
            if out.finished:
                order.append(out.request_id)
    got["_order"] = order  # type: ignore[assignment]
    return got


def alone(llm: LLM, p: list[int], params: SamplingParams) -> list[int]:
    return llm.generate([p], params)[0].outputs[0].token_ids


def test_full_slots_preempt_the_newest_low_priority_sequence(tiny, hf_model):
    llm = LLM(str(tiny), kv_cache_bytes=16 << 20, max_num_seqs=2)
    low = [prompt(llm, 1), prompt(llm, 2)]
    high = prompt(llm, 3)
    got = run(llm, low, high, low_steps=3)
    sched = llm.engine.scheduler
    assert sched.num_preemptions >= 1
    assert got["_order"][0] == "high"  # it ran ahead of both, which had many tokens left
    assert got["high"] == hf_greedy(hf_model, high, 8)
    for i, p in enumerate(low):  # recompute kept what they had generated: nothing changed
        assert got[f"low{i}"] == alone(llm, p, LOW)
    assert_no_leaks(llm)


def test_kv_block_pressure_preempts_low_priority_work(tiny, hf_model):
    # 512 B of K/V per token (see test_engine): 16 blocks of 4 tokens, room for the two low ones and no more.
    llm = LLM(str(tiny), kv_cache_bytes=512 * 4 * 16, block_size=4, max_model_len=64, enable_prefix_caching=False)
    low = [prompt(llm, 4, 24), prompt(llm, 5, 24)]
    high = prompt(llm, 6, 24)
    got = run(llm, low, high, low_steps=2)
    assert llm.engine.scheduler.num_preemptions >= 1
    assert got["_order"][0] == "high"
    assert got["high"] == hf_greedy(hf_model, high, 8)
    for i, p in enumerate(low):
        assert got[f"low{i}"] == alone(llm, p, LOW)
    assert_no_leaks(llm)


def test_equal_priorities_never_preempt_for_a_slot(tiny):
    llm = LLM(str(tiny), kv_cache_bytes=16 << 20, max_num_seqs=2)
    eng = llm.engine
    for i in range(2):
        eng.add_request(f"a{i}", prompt(llm, 10 + i), LOW)
    eng.step()
    eng.add_request("b", prompt(llm, 12), LOW)
    eng.step()
    assert eng.scheduler.num_preemptions == 0 and [s.request_id for s in eng.scheduler.waiting] == ["b"]
    while eng.has_work():
        eng.step()
    assert_no_leaks(llm)


def test_waiting_queue_is_priority_then_fifo(tiny):
    llm = LLM(str(tiny), kv_cache_bytes=16 << 20, max_num_seqs=1)
    eng = llm.engine
    for rid, prio in [("b1", 4), ("a1", 1), ("i1", 0), ("b2", 4), ("a2", 1)]:
        eng.add_request(rid, prompt(llm, 20), replace(LOW, max_tokens=2, priority=prio))
    finished = []
    while eng.has_work():
        finished += [o.request_id for o in eng.step() if o.finished]
    assert finished == ["i1", "a1", "a2", "b1", "b2"]
    assert_no_leaks(llm)


def test_priority_out_of_range_is_a_client_error():
    for bad in (-1, 5):
        try:
            SamplingParams(priority=bad)
        except EngineError as e:
            assert e.code == "invalid_sampling_params"
        else:
            raise AssertionError(f"priority {bad} accepted")


def test_preempting_forked_seeded_sequences_keeps_their_outputs(tiny, hf_model):
    """n=2 seeded sampling with logprobs, preempted mid-decode: what it returns equals the run without."""
    llm = LLM(str(tiny), kv_cache_bytes=16 << 20, max_num_seqs=2, block_size=4)
    sampled = SamplingParams(n=2, max_tokens=20, temperature=1.0, top_k=50, seed=7, logprobs=2, ignore_eos=True,
                             priority=PRIORITY_BATCH)
    p, high = prompt(llm, 40, 22), prompt(llm, 41)
    ref = llm.generate([p], sampled)[0]
    eng = llm.engine
    eng.add_request("low", p, sampled)
    got: dict[int, list[int]] = {0: [], 1: []}
    logprobs: dict[int, list[float]] = {0: [], 1: []}
    high_ids: list[int] = []
    steps = 0
    while eng.has_work():
        if steps == 4:
            assert len(eng.scheduler.running) == 2
            eng.add_request("high", high, HIGH)
        steps += 1
        for out in eng.step():
            for c in out.outputs:
                if out.request_id == "low":
                    got[c.index] += c.token_ids
                    logprobs[c.index] += [lp.logprob for lp in c.logprobs or []]
                else:
                    high_ids += c.token_ids
    assert eng.scheduler.num_preemptions >= 1
    assert high_ids == hf_greedy(hf_model, high, 8)
    for c in ref.outputs:
        assert got[c.index] == c.token_ids
        # float noise of a different batch, not a different token: logprobs agree to rounding
        assert logprobs[c.index] == pytest.approx([lp.logprob for lp in c.logprobs or []], abs=1e-4)
    assert_no_leaks(llm)
