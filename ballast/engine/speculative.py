"""Speculative decoding: cheap proposals of the next k tokens, verified by the target model in one forward.

A decoding sequence that gets a proposal (`ScheduledSeq.draft`) is run as a k+1-token chunk over the
paged KV cache: its last real token and the k drafts. Row i's logits are the target's distribution after
draft i, so accepting drafts left to right and adding one token from the first rejected row (or the row
after the last draft) gives 1..k+1 tokens per step for the price of one forward. Greedy rows accept a
draft when it is the argmax, so greedy output is the non-speculative output. Sampled rows use rejection
sampling (Leviathan et al. 2023, Chen et al. 2023): accept draft d with probability min(1, p(d)/q(d)),
else draw from max(p - q, 0) renormalised, so every emitted token is distributed as p exactly.

The KV written for rejected drafts is garbage past the sequence's computed length: it is overwritten by
later steps, and whole blocks allocated only for drafts go back to the pool (`BlockManager.trim`).

Not speculated (they decode one token per step as before): guided (structured-output) requests, whose
grammar would have to be advanced and rolled back per draft; requests with penalties, whose logits depend
on every earlier token; and requests that ask for logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ballast.engine.errors import EngineError
from ballast.engine.sampler import sampling_probs
from ballast.engine.sequence import Sequence

METHODS = ("ngram", "self_draft", "draft_model")


@dataclass
class SpecConfig:
    """`engine.speculative` of ballast.yaml (or the `speculative` engine argument as a dict)."""

    method: str = "ngram"
    num_tokens: int = 4  # k: tokens proposed per step
    ngram_max: int = 4  # n-gram lookup: longest suffix matched in the prompt and output so far
    ngram_min: int = 1
    draft_layers: int = 0  # self_draft: the target's first layers used as the draft (0: a third of them)
    draft_checkpoint: str | None = None  # draft_model: a checkpoint sharing the target's tokenizer
    adaptive: bool = True  # turn speculation down per step when measured step costs say so

    @classmethod
    def parse(cls, raw: dict[str, Any] | SpecConfig | None) -> SpecConfig | None:
        if raw is None or isinstance(raw, SpecConfig):
            return raw
        try:
            cfg = cls(**raw)
        except TypeError as e:
            raise EngineError(f"speculative: {e}", "invalid_engine_args") from None
        if cfg.method not in METHODS:
            raise EngineError(f"speculative.method must be one of {', '.join(METHODS)}, got {cfg.method!r}",
                              "invalid_engine_args")
        if not 1 <= cfg.num_tokens <= 16 or not 1 <= cfg.ngram_min <= cfg.ngram_max:
            raise EngineError("speculative.num_tokens must be 1..16 and 1 <= ngram_min <= ngram_max",
                              "invalid_engine_args")
        if cfg.method == "draft_model" and not cfg.draft_checkpoint:
            raise EngineError("speculative.method draft_model needs draft_checkpoint", "invalid_engine_args")
        return cfg


def eligible(seq: Sequence) -> bool:
    """Whether this sequence may decode speculatively (see the module docstring for the exceptions)."""
    p = seq.params
    return seq.matcher is None and p.logprobs is None and not p.penalized


def ngram_propose(tokens: list[int], k: int, nmax: int, nmin: int) -> list[int]:
    """Prompt lookup: the k tokens that followed the latest earlier occurrence of the longest suffix
    (nmax down to nmin tokens) of `tokens`; [] when no suffix recurs."""
    total = len(tokens)
    for n in range(min(nmax, total - 1), nmin - 1, -1):
        suffix = tokens[total - n :]
        first = suffix[0]
        # Latest occurrence first: recent context predicts the continuation best.
        for start in range(total - n - 1, -1, -1):
            if tokens[start] == first and tokens[start : start + n] == suffix:
                follow = tokens[start + n : start + n + k]
                if follow:
                    return follow
    return []


class Proposer(Protocol):
    catch_up: tuple[int, float]  # the last proposal's catch-up of a draft's own cache: tokens, seconds

    def lag(self, seq: Sequence) -> int:
        """Tokens a proposal for `seq` would first have to run through the draft to catch up (drafter.py)."""
        ...

    def propose(self, seqs: list[Sequence], k: int) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Drafts for each sequence (possibly empty) and, for sampled rows of a model draft, their [k, V]
        draft distributions (None: a deterministic draft, q is one-hot)."""
        ...


class NgramProposer:
    def __init__(self, cfg: SpecConfig):
        self.cfg = cfg
        self.catch_up = (0, 0.0)

    def lag(self, seq: Sequence) -> int:
        return 0

    def propose(self, seqs: list[Sequence], k: int) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        drafts = [ngram_propose(s.token_ids, k, self.cfg.ngram_max, self.cfg.ngram_min) for s in seqs]
        return drafts, [None] * len(seqs)


def _uniform(seq: Sequence) -> float:
    # A seeded request draws from its own CPU generator, so its result does not depend on the batch.
    return float(torch.rand((), generator=seq.generator)) if seq.generator is not None else float(torch.rand(()))


def _draw(probs: torch.Tensor, seq: Sequence) -> int:
    return int(torch.multinomial(probs.float().cpu(), 1, generator=seq.generator))


def verify(logits: torch.Tensor, seq: Sequence, draft: list[int], q: torch.Tensor | None) -> list[int]:
    """The tokens a speculative step emits: accepted drafts then one more token.

    logits: [len(draft) + 1, V] target rows; q: [len(draft), V] draft distributions, or None (one-hot).
    """
    if seq.params.greedy:
        best = torch.argmax(logits, dim=-1).tolist()
        out = []
        for d, b in zip(draft, best, strict=False):
            if d != b:
                break
            out.append(d)
        out.append(best[len(out)])
        return out
    p = sampling_probs(logits, [seq] * logits.shape[0]).float().cpu()
    out = []
    for i, d in enumerate(draft):
        qd = float(q[i, d]) if q is not None else 1.0
        if qd > 0 and _uniform(seq) < min(1.0, float(p[i, d]) / qd):
            out.append(d)
            continue
        if q is not None:
            residual = torch.clamp(p[i] - q[i].float().cpu(), min=0)
        else:
            residual = p[i].clone()
            residual[d] = 0
        total = float(residual.sum())
        out.append(_draw(residual / total if total > 0 else p[i], seq))
        return out
    out.append(_draw(p[len(draft)], seq))
    return out


@dataclass
class SpecStats:
    """Counters for /metrics: drafts proposed and accepted, speculative steps and the tokens they emitted."""

    proposed: int = 0
    accepted: int = 0
    steps: int = 0
    emitted: int = 0
    skipped_steps: int = 0  # decode steps where the estimator turned speculation off
    per_request: dict[str, list[int]] = field(default_factory=dict)  # id -> [proposed, accepted, steps, emitted]

    def record(self, request_id: str, proposed: int, emitted: int) -> None:
        accepted = max(0, emitted - 1)
        self.proposed += proposed
        self.accepted += accepted
        self.steps += 1
        self.emitted += emitted
        r = self.per_request.setdefault(request_id, [0, 0, 0, 0])
        r[0] += proposed
        r[1] += accepted
        r[2] += 1
        r[3] += emitted

    def pop_request(self, request_id: str) -> dict[str, float] | None:
        """A finished request's own figures (None if it never speculated); forgets them."""
        r = self.per_request.pop(request_id, None)
        if r is None:
            return None
        return {"proposed_tokens": r[0], "accepted_tokens": r[1], "steps": r[2],
                "acceptance_rate": r[1] / r[0] if r[0] else 0.0, "tokens_per_step": r[3] / r[2]}

    def as_dict(self) -> dict[str, float]:
        return {
            "spec_proposed_tokens": self.proposed,
            "spec_accepted_tokens": self.accepted,
            "spec_steps": self.steps,
            "spec_emitted_tokens": self.emitted,
            "spec_skipped_steps": self.skipped_steps,
            "spec_acceptance_rate": self.accepted / self.proposed if self.proposed else 0.0,
            "spec_tokens_per_step": self.emitted / self.steps if self.steps else 0.0,
        }
