"""Speculative decoding on the tiny checkpoint: greedy outputs identical to plain decoding (prefix-cache
hits and preemption included), sampled outputs distributed as without speculation, blocks never leaked."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from ballast.engine import LLM, SamplingParams
from ballast.engine.errors import EngineError
from ballast.engine.sequence import Sequence
from ballast.engine.speculative import ngram_propose, verify
from tests.engine.conftest import assert_no_leaks

NGRAM = {"method": "ngram", "num_tokens": 4, "adaptive": False}


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Token prompts that repeat part of themselves, so the output tends to copy from the prompt."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        base = [rng.randrange(3, 500) for _ in range(rng.randrange(5, 30))]
        out.append(base + base[: rng.randrange(1, len(base))])
    return out


def _tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_ngram_lookup_takes_the_latest_longest_match() -> None:
    toks = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert ngram_propose(toks, 2, 3, 1) == [7, 8]  # suffix [2, 3]: latest earlier occurrence is followed by 7, 8
    assert ngram_propose([1, 2, 3], 4, 3, 1) == []
    assert ngram_propose([4, 5, 4], 3, 2, 1) == [5, 4]


def test_config_is_checked(tiny: Path) -> None:
    for bad in ({"method": "medusa"}, {"num_tokens": 0}, {"method": "draft_model"}, {"nope": 1}):
        with pytest.raises(EngineError):
            LLM(str(tiny), kv_cache_memory="1Mi", speculative=bad)


def test_greedy_identical_with_prefix_hits_and_preemption(tiny: Path) -> None:
    prompts = _prompts(10)
    prompts += [prompts[0] + [7, 8, 9], prompts[1] * 2]  # share cached full blocks of earlier prompts
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = LLM(str(tiny), kv_cache_memory="1Mi", num_threads=1)
    want = _tokens(plain, prompts, params)
    spec = LLM(str(tiny), kv_cache_memory="1Mi", num_threads=1, speculative=NGRAM)
    assert _tokens(spec, prompts, params) == want
    assert _tokens(spec, prompts, params) == want  # again, the prompts now all in the prefix cache
    stats = spec.engine.stats()
    assert stats["prefix_cache_hits"] > 0
    assert stats["spec_accepted_tokens"] > 0 and stats["spec_tokens_per_step"] > 1
    assert stats["spec_accepted_tokens"] < stats["spec_proposed_tokens"]  # rejections happened and rolled back
    assert_no_leaks(spec)
    # A cache of 8 blocks (128 tokens) for 4 sequences of ~80: sequences are preempted and recomputed.
    small = LLM(str(tiny), kv_cache_memory="64Ki", num_threads=1, speculative=NGRAM)
    assert _tokens(small, prompts[:4], params) == want[:4]
    assert small.engine.stats()["num_preemptions"] > 0
    assert_no_leaks(small)


def test_unspeculated_requests_keep_their_features(tiny: Path) -> None:
    """Logprobs and penalties decode one token per step under a speculative engine, with the same output."""
    prompts = _prompts(3, seed=1)
    plain = LLM(str(tiny), kv_cache_memory="1Mi", num_threads=1)
    spec = LLM(str(tiny), kv_cache_memory="1Mi", num_threads=1, speculative=NGRAM)
    for params in (SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3, ignore_eos=True)):
        a, b = plain.generate(prompts, params), spec.generate(prompts, params)
        assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert spec.engine.stats()["spec_steps"] == 0
    assert len(spec.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=3, logprobs=1))[0]
               .outputs[0].logprobs or []) == 3


def _seq(temperature: float, seed: int) -> Sequence:
    return Sequence("r", 0, [1, 2], SamplingParams(temperature=temperature, seed=seed), 0, 100)


@pytest.mark.parametrize("draft_q", ["one_hot", "distribution"])
def test_rejection_sampling_keeps_the_distribution(draft_q: str) -> None:
    """Emitted tokens are distributed as the target's p, whatever the draft's q (fixed seeds): a fixed
    draft with a one-hot q (n-gram lookup) or drafts drawn from a distribution q (a draft model).

    8 tokens, 20000 draws: the total variation distance between the empirical and the exact distribution
    is under 0.02 (its standard deviation here is about 0.005)."""
    g = torch.Generator().manual_seed(0)
    vocab, draws = 8, 20000
    logits = torch.randn(3, vocab, generator=g) * 1.5
    p = torch.softmax(logits, dim=-1)
    draft = [int(torch.argsort(p[0])[-3]), int(torch.argmax(p[1]))]  # the third likeliest, then the likeliest
    q = torch.softmax(torch.randn(2, vocab, generator=g), dim=-1) if draft_q == "distribution" else None
    seq = _seq(1.0, 1234)
    first = torch.zeros(vocab)
    second = torch.zeros(vocab)
    for _ in range(draws):
        if q is not None:
            draft = torch.multinomial(q, 1, generator=g).view(-1).tolist()
        out = verify(logits, seq, draft, q)
        first[out[0]] += 1
        if out[0] == draft[0]:
            second[out[1]] += 1  # after an accepted first draft, the next token follows row 1
    assert 0.5 * float((first / draws - p[0]).abs().sum()) < 0.02
    n2 = float(second.sum())
    assert n2 > 1000
    assert 0.5 * float((second / n2 - p[1]).abs().sum()) < 0.05  # fewer draws here: a wider tolerance


def test_greedy_verification_accepts_the_argmax_prefix() -> None:
    logits = torch.full((4, 5), -1.0)
    for row, best in enumerate([2, 3, 1, 4]):
        logits[row, best] = 1.0
    seq = _seq(0.0, 0)
    assert verify(logits, seq, [2, 3, 0], None) == [2, 3, 1]  # third draft rejected: the argmax replaces it
    assert verify(logits, seq, [2, 3, 1], None) == [2, 3, 1, 4]  # all accepted, plus the bonus token


def test_sampled_token_frequencies_match_plain_sampling(tiny: Path) -> None:
    """Through the engine: 240 seeded requests sampled at temperature 1 over a top-3 vocabulary, with and
    without speculation. Prompts end in the model's own greedy cycle, so n-gram drafts are often (not
    always) accepted. The pooled frequencies of output tokens are compared with a chi-square test of
    homogeneity: the fixed seeds make it deterministic, and it must not reject at the 0.001 level."""
    stats = pytest.importorskip("scipy.stats")
    plain = LLM(str(tiny), kv_cache_memory="2Mi", num_threads=1)
    seeds = _prompts(12, seed=3)
    cycles = _tokens(plain, seeds, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    prompts = [s + c for s, c in zip(seeds, cycles, strict=True) for _ in range(20)]
    params = [SamplingParams(temperature=1.0, top_k=3, max_tokens=8, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    counts = []
    for llm in (plain, LLM(str(tiny), kv_cache_memory="2Mi", num_threads=1, speculative=NGRAM)):
        # Categories: (prompt, token), pooled over output positions 2.. (the first is never speculated).
        outs = llm.generate(prompts, params)
        keys = [i // 20 * 512 + t for i, o in enumerate(outs) for t in o.outputs[0].token_ids[1:]]
        counts.append(torch.bincount(torch.tensor(keys), minlength=12 * 512))
    s = llm.engine.stats()
    assert s["spec_accepted_tokens"] > 50 and s["spec_accepted_tokens"] < s["spec_proposed_tokens"]
    assert_no_leaks(llm)
    table = torch.stack(counts)
    table = table[:, table.sum(0) >= 10].numpy()  # categories with enough counts for the test
    assert table.shape[1] >= 8
    assert stats.chi2_contingency(table).pvalue > 0.001
