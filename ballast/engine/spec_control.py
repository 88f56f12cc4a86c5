"""When and for whom to speculate: proposals attached to a scheduled step, and the adaptive switch.

Speculation trades compute for fewer steps. At batch 1 a forward is bound by reading the weights, so
verifying k+1 tokens costs about as much as decoding one and every accepted draft is nearly free. In a
large batch the forward is bound by compute and the k extra rows per sequence cost real time, so
rejected drafts make each emitted token dearer. Where the crossover lies depends on the machine, the
model and the acceptance rate of the traffic, so it is measured, not configured: `StepCostEstimator`
keeps an EWMA of seconds per emitted token for speculative and plain decode steps, per batch-size bucket
(powers of two), and each step takes the cheaper mode, trying the other one now and then to stay current
(the dearer it was, the less often).
"""

from __future__ import annotations

from typing import Any

from ballast.engine.block_manager import BlockManager
from ballast.engine.scheduler import ScheduledSeq
from ballast.engine.speculative import NgramProposer, Proposer, SpecConfig, SpecStats, eligible


class StepCostEstimator:
    """Step seconds per emitted token, keyed by (speculative?, batch-size bucket): an EWMA of step seconds
    over an EWMA of tokens per step, so a step that emitted many tokens weighs as much as it saved (an
    average of per-step ratios would overweight the steps whose drafts were all rejected)."""

    def __init__(self, alpha: float = 0.2, explore_every: int = 16):
        self.alpha = alpha
        self.explore_every = explore_every
        self._avg: dict[tuple[bool, int], tuple[float, float]] = {}  # (seconds, tokens) per step
        self._choices: dict[int, int] = {}

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

    def choose(self, batch_size: int) -> bool:
        """Whether to speculate at this batch size: the cheaper mode by the estimates, the unmeasured one
        first, and now and then the other mode (every `explore_every` steps times how much dearer it is),
        so a stale estimate gets corrected."""
        b = self.bucket(batch_size)
        cost = self.cost
        spec, plain = cost.get((True, b)), cost.get((False, b))
        if spec is None:
            return True
        if plain is None:
            return False
        n = self._choices[b] = self._choices.get(b, 0) + 1
        # The dearer the other mode, the rarer the try: a draft costing 3x per token is retried a third as often.
        every = round(self.explore_every * max(spec, plain) / max(min(spec, plain), 1e-12))
        explore = self.explore_every > 0 and n % max(1, every) == 0
        return (spec < plain) != explore


class Speculator:
    """Attaches drafts to the decodes of a scheduled step and keeps the statistics and cost estimates."""

    def __init__(self, cfg: SpecConfig, proposer: Proposer, blocks: BlockManager):
        self.cfg = cfg
        self.proposer = proposer
        self.blocks = blocks
        self.stats = SpecStats()
        self.estimator = StepCostEstimator()

    def attach(self, batch: list[ScheduledSeq]) -> bool:
        """Propose drafts for the eligible decodes of `batch` (blocks for them allocated, never by preempting
        anyone); returns whether any sequence got one."""
        decodes = [s for s in batch if s.num_tokens == 1 and s.seq.num_computed > 0 and s.samples]
        if self.cfg.adaptive and len(decodes) == len(batch) and not self.estimator.choose(len(batch)):
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
        """A finished step's measured cost, when it was a pure decode step (prefill chunks skew it)."""
        if self.cfg.adaptive and batch and all(s.num_tokens == 1 and s.seq.num_computed > 1 for s in batch):
            self.estimator.observe(speculative, len(batch), seconds, tokens)


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
