"""When and for whom to speculate: proposals attached to a scheduled step, and the adaptive switch.

Speculation trades compute for fewer steps. At batch 1 a forward is bound by reading the weights, so
verifying k+1 tokens costs about as much as decoding one and every accepted draft is nearly free. In a
large batch the forward is bound by compute and the k extra rows per sequence cost real time, so
rejected drafts make each emitted token dearer. Where the crossover lies depends on the machine, the
model and the acceptance rate of the traffic, so it is measured, not configured: `StepCostEstimator`
keeps an EWMA of seconds per emitted token for speculative and plain decode steps, per batch-size bucket
(powers of two), and each step takes the cheaper mode, trying speculation now and then to stay current
(the dearer it was, the less often, and less often again after every try that found it dearer).

A draft model with its own KV cache does not run while speculation is off; turning it back on first
costs a catch-up of the tokens its cache missed (drafter.py). That cost is measured on its own and
charged to the decision: speculation comes back on only when its saving over the next tokens (at most
HORIZON per sequence) pays for the catch-up, and a try while it is the dearer mode is spaced out by
what the try costs, catch-up included.
"""

from __future__ import annotations

from typing import Any

from ballast.engine.block_manager import BlockManager
from ballast.engine.scheduler import ScheduledSeq
from ballast.engine.speculative import NgramProposer, Proposer, SpecConfig, SpecStats, eligible

HORIZON = 64  # tokens per sequence over which a catch-up of the draft's cache is paid back, at most
MAX_BACKOFF = 16  # a mode found dearer again and again is retried up to 16 times less often


class StepCostEstimator:
    """Step seconds per emitted token, keyed by (speculative?, batch-size bucket): an EWMA of step seconds
    over an EWMA of tokens per step, so a step that emitted many tokens weighs as much as it saved (an
    average of per-step ratios would overweight the steps whose drafts were all rejected). Speculative
    steps are measured without the catch-up of a draft model's cache, which is kept apart (seconds per
    caught-up token) and charged to the step that would cause it."""

    def __init__(self, alpha: float = 0.2, explore_every: int = 16):
        self.alpha = alpha
        self.explore_every = explore_every
        self._avg: dict[tuple[bool, int], tuple[float, float]] = {}  # (seconds, tokens) per step
        self._since: dict[int, int] = {}  # per bucket: steps since speculation was last tried
        self._backoff: dict[int, int] = {}  # per bucket: 1, 2, 4, ... while tries keep finding it dearer
        self.catch_up: float | None = None  # EWMA seconds per token of a draft cache's catch-up

    @property
    def cost(self) -> dict[tuple[bool, int], float]:
        """Current estimates: seconds per emitted token."""
        return {k: s / t for k, (s, t) in self._avg.items()}

    @staticmethod
    def bucket(batch_size: int) -> int:
        """1, 2-3, 4-7, 8-15, ...: the cost per token changes smoothly with the batch size."""
        return max(1, batch_size).bit_length()

    def observe(self, speculative: bool, batch_size: int, seconds: float, tokens: int) -> None:
        """One measured decode step: `tokens` emitted in `seconds` by a batch of `batch_size` sequences."""
        if tokens <= 0 or seconds < 0:
            return
        key = (speculative, self.bucket(batch_size))
        old = self._avg.get(key)
        if old is None:
            self._avg[key] = (seconds, float(tokens))
        else:
            a = self.alpha
            self._avg[key] = (old[0] + a * (seconds - old[0]), old[1] + a * (tokens - old[1]))

    def observe_catch_up(self, tokens: int, seconds: float) -> None:
        """A draft model's catch-up: `tokens` run through it in `seconds`."""
        if tokens > 0 and seconds >= 0:
            per = seconds / tokens
            self.catch_up = per if self.catch_up is None else self.catch_up + self.alpha * (per - self.catch_up)

    def _ratio_below(self, b: int) -> float | None:
        """spec/plain cost at the nearest smaller bucket measured both ways: speculation pays less as batches
        grow, so where it was dearer with fewer sequences it is not tried blind with more."""
        cost = self.cost
        for lower in range(b - 1, 0, -1):
            spec, plain = cost.get((True, lower)), cost.get((False, lower))
            if spec is not None and plain is not None:
                return spec / max(plain, 1e-12)
        return None

    def _estimates(self, b: int) -> tuple[float | None, float | None]:
        cost = self.cost
        spec, plain = cost.get((True, b)), cost.get((False, b))
        if spec is None and plain is not None:
            r = self._ratio_below(b)
            spec = plain * r if r is not None and r > 1 else None
        return spec, plain

    def choose(self, batch_size: int, catch_up_tokens: int = 0, horizon: int = 0, explore: bool = True) -> bool:
        """Whether to speculate at this batch size: the cheaper mode by the estimates (the unmeasured one
        first), counting the catch-up of `catch_up_tokens` as paid back over `horizon` emitted tokens; and,
        when `explore`, now and then speculation while it is the dearer mode, so a stale estimate gets
        corrected: every `explore_every` steps times how much dearer the try would be (catch-up included),
        an interval that doubles with every try up to MAX_BACKOFF times."""
        b = self.bucket(batch_size)
        spec, plain = self._estimates(b)
        if spec is None:
            r = self._ratio_below(b)
            return plain is not None or r is None or r <= 1
        if plain is None:
            return False
        extra = (self.catch_up or 0.0) * catch_up_tokens
        if spec + extra / max(horizon, 1) < plain:
            self._backoff[b] = 1
            return True
        if not explore or self.explore_every <= 0:
            return False
        n = self._since[b] = self._since.get(b, 0) + 1
        try_cost = spec + extra / max(batch_size, 1)  # one step's worth: the try pays its catch-up alone
        backoff = self._backoff.get(b, 1)
        if n < self.explore_every * backoff * try_cost / max(plain, 1e-12):
            return False
        self._since[b] = 0
        self._backoff[b] = min(MAX_BACKOFF, 2 * backoff)
        return True


class Speculator:
    """Attaches drafts to the decodes of a scheduled step and keeps the statistics and cost estimates."""

    def __init__(self, cfg: SpecConfig, proposer: Proposer, blocks: BlockManager):
        self.cfg = cfg
        self.proposer = proposer
        self.blocks = blocks
        self.stats = SpecStats()
        self.estimator = StepCostEstimator()
        self._catch_up_s = 0.0  # this step's catch-up seconds, kept out of its measured cost

    def _choose(self, batch: list[ScheduledSeq], decodes: list[ScheduledSeq]) -> bool:
        """The switch for this step: pure decode steps explore, steps with prefills only follow the estimates."""
        seqs = [s.seq for s in decodes if eligible(s.seq)]
        lag = sum(self.proposer.lag(s) for s in seqs)
        horizon = sum(min(s.max_len - s.num_tokens, HORIZON) for s in seqs)
        pure = len(decodes) == len(batch)
        return self.estimator.choose(len(decodes), lag, horizon, explore=pure)

    def attach(self, batch: list[ScheduledSeq]) -> bool:
        """Propose drafts for the eligible decodes of `batch` (blocks for them allocated, never by preempting
        anyone); returns whether any sequence got one."""
        self._catch_up_s = 0.0
        decodes = [s for s in batch if s.num_tokens == 1 and s.seq.num_computed > 0 and s.samples]
        if self.cfg.adaptive and decodes and not self._choose(batch, decodes):
            if len(decodes) == len(batch):
                self.stats.skipped_steps += 1
            return False
        cands = []
        for sch in decodes:  # blocks for the longest draft first (a model draft writes them), trimmed after
            seq = sch.seq
            if (seq.max_len - seq.num_tokens > 1 and eligible(seq)
                    and self.blocks.allocate(seq, seq.num_tokens + self.cfg.num_tokens)):
                cands.append(sch)
        if not cands:
            return False
        drafts, probs = self.proposer.propose([s.seq for s in cands], self.cfg.num_tokens)
        tokens, self._catch_up_s = self.proposer.catch_up
        self.estimator.observe_catch_up(tokens, self._catch_up_s)
        any_draft = False
        for sch, draft, q in zip(cands, drafts, probs, strict=True):
            seq = sch.seq
            draft = draft[: seq.max_len - seq.num_tokens - 1]  # never past max_tokens or the context
            self.blocks.trim(seq, seq.num_tokens + len(draft))
            sch.draft = draft
            sch.draft_probs = q[: len(draft)] if q is not None and draft else None
            any_draft = any_draft or bool(draft)
        return any_draft

    def observe(self, batch: list[ScheduledSeq], speculative: bool, seconds: float, tokens: int) -> None:
        """After a step: a draft cache holds no rejected draft (clamped to what the target computed), and the
        step's measured cost is recorded when it was a pure decode step (prefill chunks skew it)."""
        for sch in batch:
            sch.seq.draft_computed = min(sch.seq.draft_computed, sch.seq.num_computed)
        if self.cfg.adaptive and batch and all(s.num_tokens == 1 and s.seq.num_computed > 1 for s in batch):
            self.estimator.observe(speculative, len(batch), max(0.0, seconds - self._catch_up_s), tokens)


def make_speculator(raw: dict[str, Any] | SpecConfig | None, runner: Any, blocks: BlockManager) -> Speculator | None:
    """The engine's speculator for `EngineArgs.speculative` (None: speculation off, the default)."""
    cfg = SpecConfig.parse(raw)
    if cfg is None:
        return None
    proposer: Proposer
    if cfg.method == "ngram":
        proposer = NgramProposer(cfg)
    else:
        from ballast.engine.drafter import make_drafter

        proposer = make_drafter(cfg, runner)
    return Speculator(cfg, proposer, blocks)
