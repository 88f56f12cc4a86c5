"""Turning logits into tokens: penalties, temperature, top-k, top-p, min-p, seeded sampling, logprobs.

Greedy rows are one argmax for the whole batch. Sampled rows each draw from their own seeded
generator when a seed is given, so a request gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import torch

from ballast.engine.guided import apply_masks
from ballast.engine.sequence import Sequence


def _apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    device = logits.device
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=device)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and seq.num_output_tokens:
        out = torch.tensor(seq.token_ids[seq.num_prompt_tokens :], dtype=torch.long, device=device)
        counts = torch.bincount(out, minlength=logits.shape[-1]).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _filter(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """top-k, min-p and top-p over a [R, V] batch of temperature-scaled logits, each row its own values."""
    dev = logits.device
    vocab = logits.shape[-1]
    top_k = [s.params.top_k if 0 < s.params.top_k < vocab else vocab for s in seqs]
    if min(top_k) < vocab:
        k = torch.tensor(top_k, device=dev)
        vals = torch.topk(logits, max(top_k), dim=-1).values
        kth = vals.gather(1, (k.clamp(max=vals.shape[1]) - 1)[:, None])
        kth = torch.where(k[:, None] >= vocab, torch.full_like(kth, float("-inf")), kth)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    min_p = [s.params.min_p for s in seqs]
    if max(min_p) > 0:
        probs = torch.softmax(logits, dim=-1)
        mp = torch.tensor(min_p, device=dev, dtype=probs.dtype)[:, None]
        logits = logits.masked_fill(probs < mp * probs.amax(-1, keepdim=True), float("-inf"))
    top_p = [s.params.top_p if s.params.top_p < 1.0 else 2.0 for s in seqs]
    if min(top_p) < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        tp = torch.tensor(top_p, device=dev, dtype=probs.dtype)[:, None]
        drop = probs.cumsum(-1) - probs > tp  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, idx, sorted_logits)
    return logits


def _penalize(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Penalties on a copy (the raw logits may still back the logprobs), only for rows that ask."""
    logits = logits.clone()
    for i, seq in enumerate(seqs):
        if seq.params.penalized:
            logits[i] = _apply_penalties(logits[i], seq)
    return logits


def _pick_greedy(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> None:
    """Greedy rows: one argmax for all of them (the whole batch without indexing when every row is greedy)."""
    greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
    if not greedy:
        return
    picked = torch.argmax(logits[greedy] if len(greedy) < len(seqs) else logits, dim=-1).tolist()
    for i, t in zip(greedy, picked, strict=True):
        tokens[i] = t


def _draw(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> None:
    """Sampled rows: one filter pass; unseeded rows drawn together, seeded rows each from their generator."""
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if not sampled:
        return
    rows = [seqs[i] for i in sampled]
    temps = torch.tensor([s.params.temperature for s in rows], device=logits.device, dtype=logits.dtype)
    x = _filter(logits[sampled] / temps[:, None], rows)
    probs = torch.softmax(x, dim=-1)
    free = [j for j, s in enumerate(rows) if s.generator is None]
    if free:
        drawn = torch.multinomial(probs[free], 1).view(-1).tolist()
        for j, t in zip(free, drawn, strict=True):
            tokens[sampled[j]] = t
    for j, s in enumerate(rows):
        if s.generator is not None:
            # Seeded generators live on the CPU, so a seed gives the same tokens on any device.
            tokens[sampled[j]] = int(torch.multinomial(probs[j].float().cpu(), 1, generator=s.generator))


def sampling_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Each row's sampling distribution (temperature, top-k, min-p, top-p): what `sample` draws from for
    an unpenalised, unconstrained row; speculative verification compares drafts against it."""
    temps = torch.tensor([s.params.temperature for s in seqs], device=logits.device, dtype=logits.dtype)
    return torch.softmax(_filter(logits / temps[:, None], seqs), dim=-1)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor | None]:
    """One token per row; also returns log-softmax of the raw logits when any row wants logprobs.

    Rows are processed as batches (greedy: one argmax; sampled: one filter pass); only the draw of a
    seeded row uses its own generator, so its result does not depend on the rest of the batch.
    """
    raw_logprobs = None
    if any(s.params.logprobs is not None for s in seqs):
        raw_logprobs = torch.log_softmax(logits, dim=-1)
    if any(s.params.penalized for s in seqs):
        logits = _penalize(logits, seqs)
    if any(s.matcher is not None for s in seqs):  # constrained rows: one bitmask for the batch
        logits = apply_masks(logits, [s.matcher for s in seqs])
    tokens = [0] * len(seqs)
    _pick_greedy(logits, seqs, tokens)
    _draw(logits, seqs, tokens)
    return tokens, raw_logprobs
