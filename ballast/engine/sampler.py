"""Turning logits into tokens: penalties, temperature, top-k, top-p, min-p, seeded sampling, logprobs.

Greedy rows are one argmax for the whole batch. Sampled rows each draw from their own seeded
generator when a seed is given, so a request gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import torch

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


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, idx, sorted_logits)
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor | None]:
    """One token per row; also returns log-softmax of the raw logits when any row wants logprobs."""
    raw_logprobs = None
    if any(s.params.logprobs is not None for s in seqs):
        raw_logprobs = torch.log_softmax(logits, dim=-1)
    tokens = [0] * len(seqs)
    greedy_rows = []
    for i, seq in enumerate(seqs):
        p = seq.params
        row = logits[i]
        if p.penalized:
            row = _apply_penalties(row.clone(), seq)
        if p.greedy:
            if p.penalized:
                tokens[i] = int(torch.argmax(row))
            else:
                greedy_rows.append(i)
            continue
        row = row / p.temperature
        row = _filter(row, p.top_k, p.top_p, p.min_p)
        probs = torch.softmax(row, dim=-1)
        tokens[i] = int(torch.multinomial(probs, 1, generator=seq.generator))
    if greedy_rows:
        picked = torch.argmax(logits[greedy_rows], dim=-1).tolist()
        for i, t in zip(greedy_rows, picked, strict=True):
            tokens[i] = t
    return tokens, raw_logprobs
