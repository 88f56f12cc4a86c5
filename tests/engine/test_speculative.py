"""Speculative decoding on the tiny checkpoint: greedy outputs identical to plain decoding (prefix-cache
hits and preemption included), sampled outputs distributed as without speculation, blocks never leaked."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny checkpoint: the same tokenizer (same corpus), other weights and one layer."""
    from ballast.engine.tools import make_tiny

    return make_tiny(tmp_path_factory.mktemp("draft") / "tiny", layers=1, hidden=64, vocab_size=512, seed=1)


@pytest.mark.parametrize("method", ["self_draft", "draft_model"])
def test_model_drafts_keep_greedy_output(tiny: Path, tiny_draft: Path, method: str) -> None:
    prompts = _prompts(6, seed=4)
    prompts.append(prompts[0] + [5, 6])  # a prefix-cache hit: the draft model's cache must hold it too
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = _tokens(LLM(str(tiny), kv_cache_memory="1Mi", num_threads=1), prompts, params)
    spec_cfg = {"method": method, "num_tokens": 3, "adaptive": False, "draft_layers": 1,
                "draft_checkpoint": str(tiny_draft if method == "draft_model" else tiny)}
    spec = LLM(str(tiny), kv_cache_memory="1Mi", num_threads=1, speculative=spec_cfg)
    assert _tokens(spec, prompts, params) == want
    assert _tokens(spec, prompts, params) == want
    s = spec.engine.stats()
    assert s["spec_steps"] > 0 and 0 < s["spec_proposed_tokens"] <= 3 * s["spec_steps"]
    assert_no_leaks(spec)
    # A draft of the target itself (same weights, all layers) is always right: k + 1 tokens per step.
    same = {**spec_cfg, "draft_checkpoint": str(tiny), "method": "draft_model"}
    exact = LLM(str(tiny), kv_cache_memory="1Mi", num_threads=1, speculative=same)
    assert _tokens(exact, prompts, params) == want
    e = exact.engine.stats()
    assert e["spec_accepted_tokens"] == e["spec_proposed_tokens"]


def test_sampled_model_drafts_run(tiny: Path) -> None:
    """Sampled rows with a model draft: seeded, bounded, and every block back in the pool."""
    cfg = {"method": "self_draft", "num_tokens": 3, "adaptive": False, "draft_layers": 1}
    llm = LLM(str(tiny), kv_cache_memory="1Mi", num_threads=1, speculative=cfg)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, seed=7, ignore_eos=True)
    outs = llm.generate(_prompts(4, seed=5), params)
    assert all(len(o.outputs[0].token_ids) == 20 for o in outs)
    assert llm.engine.stats()["spec_steps"] > 0
    assert_no_leaks(llm)


def test_estimator_takes_the_cheaper_mode_and_explores() -> None:
    from ballast.engine.spec_control import StepCostEstimator

    est = StepCostEstimator(alpha=0.5, explore_every=4)
    assert est.choose(8) is True  # nothing measured: speculation is tried first
    est.observe(True, 8, 0.30, 10)  # 30 ms per token speculating
    assert est.choose(8) is False  # plain decoding not measured yet
    est.observe(False, 8, 0.16, 8)  # 20 ms per token plain
    picks = [est.choose(9) for _ in range(20)]  # same bucket (8..15)
    # plain, with a try of speculation after 4 x 1.5 steps (it was 1.5x dearer), then after twice as many
    assert [i for i, p in enumerate(picks) if p] == [5, 17]
    assert est.choose(1) is True  # another batch-size bucket has its own estimates
    for _ in range(10):
        est.observe(True, 8, 0.10, 10)  # speculation got cheaper (say, drafts accepted more often)
    assert [est.choose(8) for _ in range(3)].count(True) >= 2


def test_large_batches_turn_speculation_off(tiny: Path) -> None:
    """Measured costs (injected through the estimator's own API) say speculation pays at batch 1 and not at
    32: a batch of 32 decodes plainly (apart from the estimator's exploration), a lone request speculates,
    and greedy output is the same either way."""
    cfg = {**NGRAM, "adaptive": True}
    llm = LLM(str(tiny), kv_cache_memory="4Mi", num_threads=1, speculative=cfg)
    spec = llm.engine.spec
    assert spec is not None
    spec.estimator.observe(True, 32, 1e3, 1)  # dear per token when batched
    spec.estimator.observe(False, 32, 1e-6, 1)
    spec.estimator.observe(True, 1, 1e-6, 1)  # cheap alone
    spec.estimator.observe(False, 1, 1e3, 1)
    prompts = _prompts(32, seed=6)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = _tokens(LLM(str(tiny), kv_cache_memory="4Mi", num_threads=1), prompts, params)
    assert _tokens(llm, prompts, params) == want
    s = llm.engine.stats()
    assert s["spec_skipped_steps"] >= 9  # 11 decode steps of 32 sequences, one explored at most
    assert s["spec_steps"] <= 32  # sequence-steps: at most the one exploring step
    assert _tokens(llm, prompts[:1], params) == want[:1]
    assert llm.engine.stats()["spec_steps"] > s["spec_steps"]
    assert_no_leaks(llm)


def test_guided_requests_run_unspeculated_beside_speculated_ones(tiny: Path) -> None:
    """A structured-output request in a speculative engine decodes one token per step and still follows its
    grammar; the free requests beside it speculate and keep their greedy output."""
    pytest.importorskip("llguidance")
    from ballast.engine.guided import GuidedSpec

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["n"], "additionalProperties": False}
    llm = LLM(str(tiny), kv_cache_memory="2Mi", num_threads=1, speculative=NGRAM)
    g = llm.engine.grammars.compile(GuidedSpec.json_schema(schema))
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = _prompts(2, seed=8)
    want = _tokens(LLM(str(tiny), kv_cache_memory="2Mi", num_threads=1), prompts, free)
    outs = llm.generate([prompts[0], "x y z", prompts[1]],
                        [free, SamplingParams(max_tokens=40, temperature=1.0, seed=3, guided=g), free])
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == want
    assert 0 <= json.loads(outs[1].outputs[0].text)["n"] <= 999
    assert outs[1].speculative is None  # the guided request never speculated
    assert outs[0].speculative is not None and outs[0].speculative["steps"] > 0
    assert llm.engine.stats()["spec_steps"] > 0
    assert_no_leaks(llm)


def test_estimator_charges_the_catch_up_of_a_draft_cache() -> None:
    """Speculation 20% cheaper per token comes back on only when its saving over the horizon pays for the
    draft cache's catch-up; a try while it is dearer is spaced out by the catch-up it would cost."""
    from ballast.engine.spec_control import StepCostEstimator

    est = StepCostEstimator(alpha=1.0, explore_every=4)
    est.observe(True, 4, 0.08, 10)  # 8 ms per token speculating, 10 ms plain
    est.observe(False, 4, 0.04, 4)
    est.observe_catch_up(100, 0.1)  # 1 ms per caught-up token
    assert est.choose(4, catch_up_tokens=20, horizon=64)  # 20 ms of catch-up against 128 ms saved
    assert not est.choose(4, catch_up_tokens=200, horizon=64, explore=False)  # 200 ms against 128 ms
    est.observe(True, 4, 0.12, 10)  # now dearer: 12 ms per token
    picks = [est.choose(4, catch_up_tokens=8, horizon=256) for _ in range(30)]
    # one try costs 12 + 8 / 4 = 14 ms per token against 10: after 4 x 1.4 steps, then 4 x 1.4 x 2
    assert [i for i, p in enumerate(picks) if p] == [5, 17]
    plain_first = StepCostEstimator()
    plain_first.observe(True, 1, 0.3, 1)
    plain_first.observe(False, 1, 0.1, 1)
    # dearer at batch 1: at batch 32 (unmeasured) plain decoding is measured first, not a blind try
    assert plain_first.choose(32) is False


def test_draft_model_idles_while_the_switch_is_off_then_catches_up(tiny: Path) -> None:
    """A draft model runs no forward while the switch has speculation off; when it comes back on after a
    long off period, one catch-up (in chunks of 8 tokens here) brings its cache level with the target's:
    the draft is the target itself, so every draft after the catch-up is accepted, and greedy output is
    the plain output."""
    from ballast.engine.drafter import ModelDrafter
    from ballast.engine.spec_control import StepCostEstimator

    prompts = _prompts(2, seed=9)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = _tokens(LLM(str(tiny), kv_cache_memory="1Mi", num_threads=1), prompts, params)
    cfg = {"method": "draft_model", "num_tokens": 3, "draft_checkpoint": str(tiny)}
    llm = LLM(str(tiny), kv_cache_memory="1Mi", num_threads=1, speculative=cfg)
    spec, eng = llm.engine.spec, llm.engine
    assert spec is not None and isinstance(spec.proposer, ModelDrafter)
    drafter = spec.proposer
    drafter.catch_up_tokens = 8
    spec.estimator = StepCostEstimator(alpha=1.0, explore_every=0)
    spec.estimator.observe(True, 2, 1e3, 1)  # speculation dear at batch 2: the switch is off
    spec.estimator.observe(False, 2, 1e-6, 1)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    got: dict[str, list[int]] = {"r0": [], "r1": []}

    def run(steps: int) -> None:
        for _ in range(steps):
            for out in eng.step():
                got[out.request_id] += out.outputs[0].token_ids if out.outputs else []

    run(25)  # the prefill and 24 decode steps, all plain
    assert drafter.forwards == 0 and eng.stats()["spec_steps"] == 0
    assert eng.stats()["spec_skipped_steps"] == 24
    lag = sum(drafter.lag(s) for r in eng.requests.values() for s in r.seqs)
    assert lag == sum(len(p) for p in prompts) + 2 * 24  # prompts and 24 decoded tokens each, never drafted
    spec.estimator.observe(True, 2, 1e-9, 1)  # speculation turns cheap: the switch comes back on
    spec.estimator.observe(False, 2, 1.0, 1)
    run(1)
    assert drafter.catch_up[0] == lag and drafter.forwards == -(-lag // 8) + 3  # chunks, then 3 draft steps
    while eng.has_work():
        run(1)
    assert [got["r0"], got["r1"]] == want
    s = eng.stats()
    assert s["spec_steps"] > 0 and s["spec_accepted_tokens"] == s["spec_proposed_tokens"] > 0
    assert_no_leaks(llm)
