"""Per-segment LoRA compute over one step's flat batch (Punica / S-LoRA style), never merged weights.

The model's fused linears (qkv, o_proj, gate_up, down_proj) are wrapped after the base weights load. Each
adapter on the device owns a slot of stacked tensors per layer and linear: A [slots, in, R] and
B [slots, R, out], where a fused linear concatenates its modules' ranks (q|k|v) and B is block-diagonal,
so one pair of matmuls serves the fused output. A step's tokens are split into segments of one adapter
(decode rows are sorted by adapter, so each adapter's decodes form one segment; each prefill chunk is its
own). Long segments (prefills) take two matmuls on views; short ones (decodes) are gathered into one padded
batch with their slots' A and B and take two batched matmuls. Base-model tokens take no LoRA work at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Fused linear → its PEFT modules in output order.
FUSED: dict[str, tuple[str, ...]] = {"qkv": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                                     "gate_up": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
_LONG = 8  # segments longer than this are computed alone (no padding to their length)


@dataclass
class LoraStep:
    """One step's adapter layout: which slot each token row and each logits row uses."""

    long: list[tuple[int, int, int]]  # (start, end, slot) computed on views
    short_idx: torch.Tensor | None  # [S * L] token rows, padded with a repeat of the segment's first row
    short_slots: torch.Tensor | None  # [S] slot of each short segment
    short_len: int  # L: the longest short segment
    short_dest: torch.Tensor | None  # token rows that receive the products (real rows only)
    short_pos: torch.Tensor | None  # their positions in the padded [S * L] batch
    token_slots: list[int]  # slot per token row (-1: base)
    head_slots: list[int]  # slot per logits row (-1: base)
    short_range: tuple[int, int] | None = None  # short segments' slots are lo..hi-1 in order: a view, no gather

    @classmethod
    def build(cls, segments: list[tuple[int, int, int]], num_tokens: int, rows: list[int],
              device: torch.device) -> LoraStep:
        token_slots = [-1] * num_tokens
        for s, e, slot in segments:
            token_slots[s:e] = [slot] * (e - s)
        long = [seg for seg in segments if seg[1] - seg[0] > _LONG]
        # Order in the padded batch is free (results are scattered back by row), so by slot: often a range.
        short = sorted((seg for seg in segments if seg[1] - seg[0] <= _LONG), key=lambda seg: seg[2])
        step = cls(long, None, None, 0, None, None, token_slots, [token_slots[r] for r in rows])
        if short:
            width = max(e - s for s, e, _ in short)
            idx: list[int] = []
            dest: list[int] = []
            pos: list[int] = []
            for i, (s, e, _) in enumerate(short):
                idx.extend(list(range(s, e)) + [s] * (width - (e - s)))
                dest.extend(range(s, e))
                pos.extend(range(i * width, i * width + e - s))

            def t(xs: list[int]) -> torch.Tensor:
                return torch.tensor(xs, dtype=torch.long, device=device)

            step.short_idx, step.short_slots, step.short_len = t(idx), t([slot for _, _, slot in short]), width
            step.short_dest, step.short_pos = t(dest), t(pos)
            slots = [slot for _, _, slot in short]
            if slots == list(range(slots[0], slots[0] + len(slots))):
                step.short_range = (slots[0], slots[0] + len(slots))
        return step


class LoraLinear(nn.Module):
    """A base linear plus the low-rank products of the adapters in the step (see module docstring)."""

    def __init__(self, base: nn.Linear, stacks: Callable[[], tuple[torch.Tensor, torch.Tensor] | None],
                 step: Callable[[], LoraStep | None]):
        super().__init__()
        self.base = base
        self._stacks = stacks  # this layer's (A [slots, in, R], B [slots, R, out]), or None before any adapter
        self._step = step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        st = self._step()
        ab = self._stacks()
        if st is None or ab is None:
            return y
        a, b = ab
        for s, e, slot in st.long:
            y[s:e] += (x[s:e] @ a[slot]) @ b[slot]
        if st.short_idx is not None:
            assert st.short_slots is not None and st.short_dest is not None and st.short_pos is not None
            xs = x.index_select(0, st.short_idx).view(st.short_slots.shape[0], st.short_len, -1)
            if st.short_range is not None:
                a_s, b_s = a[st.short_range[0] : st.short_range[1]], b[st.short_range[0] : st.short_range[1]]
            else:
                a_s, b_s = a.index_select(0, st.short_slots), b.index_select(0, st.short_slots)
            d = torch.bmm(torch.bmm(xs, a_s), b_s)
            d = d.view(-1, d.shape[-1])
            if d.shape[0] != st.short_dest.shape[0]:
                d = d.index_select(0, st.short_pos)
            y.index_add_(0, st.short_dest, d)
        return y


class LoraEmbedding(nn.Module):
    """Token embeddings, replaced for the tokens of adapters that saved their own (`modules_to_save`)."""

    def __init__(self, base: nn.Embedding, saved: Callable[[int], torch.Tensor | None],
                 step: Callable[[], LoraStep | None]):
        super().__init__()
        self.base = base
        self._saved = saved
        self._step = step

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.base(ids)
        st = self._step()
        if st is None:
            return h
        return _replace_rows(h, st.token_slots, self._saved, lambda rows, w: F.embedding(ids[rows], w))


class LoraHead(nn.Module):
    """The LM head, replaced for the logits rows of adapters that saved their own (`modules_to_save`)."""

    def __init__(self, base: nn.Linear, saved: Callable[[int], torch.Tensor | None],
                 step: Callable[[], LoraStep | None]):
        super().__init__()
        self.base = base
        self._saved = saved
        self._step = step

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.base(h)
        st = self._step()
        if st is None:
            return out
        return _replace_rows(out, st.head_slots, self._saved, lambda rows, w: h[rows] @ w.T)


def _replace_rows(out: torch.Tensor, slots: list[int], saved: Callable[[int], torch.Tensor | None],
                  compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    for slot in {s for s in slots if s >= 0}:
        w = saved(slot)
        if w is None:
            continue
        rows = torch.tensor([i for i, s in enumerate(slots) if s == slot], dtype=torch.long, device=out.device)
        out[rows] = compute(rows, w).to(out.dtype)
    return out
