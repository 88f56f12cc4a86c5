"""Model drafts for speculative decoding: k cheap autoregressive decode steps per proposal.

`self_draft` (LayerSkip, Draft & Verify): the target's own first layers, then its final norm and LM head.
Those layers compute exactly what the target computes for the same tokens, so the draft reads the
target's KV cache for them and needs no cache or prefill of its own; its writes past the computed
length are overwritten by the verifying forward. `draft_model`: a second checkpoint with the target's
tokenizer, with its own KV cache indexed by the target's block tables. It runs only when asked for a
proposal: `Sequence.draft_computed` says how many leading tokens its cache holds, and before proposing
it catches up the tokens the target computed since (the prompt, plain steps while the adaptive switch
had speculation off, the bonus token of a fully accepted step) in batched prefill forwards of at most
`catch_up_tokens` tokens. Its cache is never read past `draft_computed`, which the speculator clamps to
the target's computed length after every step (rejected drafts) and the block manager resets when the
sequence's blocks go (finish, preemption); shared prefix blocks are rewritten with what they already hold.

Sampled rows draw their drafts from the draft's own sampling distribution q and keep q, which
rejection sampling needs; greedy rows take the argmax.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ballast.engine.checkpoints import resolve_checkpoint
from ballast.engine.config import ModelConfig
from ballast.engine.errors import EngineError
from ballast.engine.layers import AttentionBatch, PrefillChunk
from ballast.engine.loader import load_weights
from ballast.engine.models import LlamaModel
from ballast.engine.sampler import sampling_probs
from ballast.engine.sequence import Sequence
from ballast.engine.speculative import SpecConfig


class Drafter:
    """k decode steps of `model` (its first `num_layers` layers) over `kv_caches`, for a batch of sequences."""

    def __init__(self, model: LlamaModel, kv_caches: list[torch.Tensor], num_layers: int, block_size: int):
        self.model = model
        self.kv_caches = kv_caches
        self.num_layers = num_layers
        self.block_size = block_size
        self.workspace = torch.empty((0, *kv_caches[0].shape[1:]), dtype=kv_caches[0].dtype,
                                     device=kv_caches[0].device)
        self.forwards = 0  # draft forward passes run, catch-up included
        self.catch_up = (0, 0.0)  # the last proposal's catch-up: tokens and seconds

    def _workspace(self, blocks: int) -> torch.Tensor:
        if self.workspace.shape[0] < blocks:
            self.workspace = torch.empty((max(blocks, 2 * self.workspace.shape[0]), *self.workspace.shape[1:]),
                                         dtype=self.workspace.dtype, device=self.workspace.device)
        return self.workspace

    def _batch(self, items: list[tuple[Sequence, int, int]]) -> AttentionBatch:
        """Attention over the draft's cache for (sequence, first position, tokens) items, single tokens first:
        those attend as one padded decode batch, longer runs as prefill chunks over their cached context."""
        bs, dev = self.block_size, self.workspace.device
        slots = [s.block_table[p // bs] * bs + p % bs for s, st, n in items for p in range(st, st + n)]
        dec = [(s, st) for s, st, n in items if n == 1]
        nd, ws = len(dec), 0
        blocks = mask = None
        if nd:
            nblk = -(-(max(st for _, st in dec) + 1) // bs)
            padded = [s.block_table[:nblk] + [0] * (nblk - min(len(s.block_table), nblk)) for s, _ in dec]
            lens = torch.tensor([st for _, st in dec]) + 1
            mask = (torch.arange(nblk * bs)[None, :] < lens[:, None])[:, None, None, :].to(dev)
            blocks = torch.tensor(padded, dtype=torch.long).view(-1).to(dev)
            ws = nd * nblk
        prefills, off = [], nd
        for seq, st, n in items[nd:]:
            ctx = None
            if st > 0:
                nblk = -(-(st + n) // bs)
                ctx = torch.tensor(seq.block_table[:nblk], dtype=torch.long, device=dev)
                ws = max(ws, nblk)
            prefills.append(PrefillChunk(off, off + n, ctx, st + n, st))
            off += n
        return AttentionBatch(torch.tensor(slots, dtype=torch.long, device=dev), nd, blocks, mask, prefills,
                              self._workspace(ws) if ws else None)

    def lag(self, seq: Sequence) -> int:
        """Tokens the target computed that this draft's cache lacks (none: it reads the target's cache)."""
        return 0

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], k: int) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """k draft tokens per sequence (blocks for them are already allocated) and, for sampled rows, q."""
        dev = self.workspace.device
        drafts: list[list[int]] = [[] for _ in seqs]
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        tokens = [s.token_ids[s.num_computed] for s in seqs]
        rows = torch.arange(len(seqs), device=dev)
        for i in range(k):
            positions = [s.num_computed + i for s in seqs]
            self.forwards += 1
            logits = self.model(torch.tensor(tokens, dtype=torch.long, device=dev),
                                torch.tensor(positions, dtype=torch.long, device=dev), self.kv_caches,
                                self._batch([(s, p, 1) for s, p in zip(seqs, positions, strict=True)]), rows,
                                num_layers=self.num_layers)
            tokens = self._pick(logits, seqs, qs)
            for d, t in zip(drafts, tokens, strict=True):
                d.append(t)
        return drafts, [torch.stack(q) if q else None for q in qs]

    @staticmethod
    def _pick(logits: torch.Tensor, seqs: list[Sequence], qs: list[list[torch.Tensor]]) -> list[int]:
        out = torch.argmax(logits, dim=-1).tolist()
        sampled = [j for j, s in enumerate(seqs) if not s.params.greedy]
        if sampled:
            probs = sampling_probs(logits[sampled], [seqs[j] for j in sampled]).float().cpu()
            for row, j in enumerate(sampled):
                out[j] = int(torch.multinomial(probs[row], 1, generator=seqs[j].generator))
                qs[j].append(probs[row])
        return out


class ModelDrafter(Drafter):
    """A draft checkpoint with its own KV cache, caught up lazily to the target's before each proposal."""

    catch_up_tokens = 1024  # tokens per catch-up forward: a long lag is caught up in chunks

    def __init__(self, path: Path, runner: Any):
        cfg = ModelConfig.load(path)
        target = runner.model_config
        if cfg.vocab_size != target.vocab_size:
            raise EngineError(f"the draft model's vocabulary ({cfg.vocab_size}) is not the target's "
                              f"({target.vocab_size}); it must share the tokenizer", "invalid_engine_args")
        with torch.device(runner.device):
            model = LlamaModel(cfg).to(runner.dtype)
        load_weights(model, path)
        model.eval()
        shape = (runner.num_blocks, runner.block_size, 2, cfg.num_kv_heads, cfg.head_dim)
        caches = [torch.zeros(shape, dtype=runner.dtype, device=runner.device) for _ in range(cfg.num_layers)]
        super().__init__(model, caches, cfg.num_layers, runner.block_size)

    def lag(self, seq: Sequence) -> int:
        return seq.num_computed - min(seq.draft_computed, seq.num_computed)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], k: int) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        t0 = time.perf_counter()
        tokens = self._catch_up(seqs)
        self.catch_up = (tokens, time.perf_counter() - t0)
        out = super().propose(seqs, k)
        for s in seqs:  # positions num_computed.. written; those past the accepted drafts are clamped after
            s.draft_computed = s.num_computed + k
        return out

    def _catch_up(self, seqs: list[Sequence]) -> int:
        """Bring the draft's cache up to each sequence's computed tokens; returns the tokens it ran."""
        todo = [(s, min(s.draft_computed, s.num_computed)) for s in seqs if self.lag(s) > 0]
        total = 0
        while todo:
            budget, items, rest = self.catch_up_tokens, [], []
            for seq, start in todo:
                n = min(seq.num_computed - start, budget)
                if n > 0:
                    items.append((seq, start, n))
                    budget -= n
                if start + max(n, 0) < seq.num_computed:
                    rest.append((seq, start + max(n, 0)))
            items.sort(key=lambda it: it[2] > 1)  # single tokens first: one batched decode attention
            ids = [t for seq, st, n in items for t in seq.token_ids[st : st + n]]
            pos = [p for _, st, n in items for p in range(st, st + n)]
            dev = self.workspace.device
            self.forwards += 1
            self.model(torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev),
                       self.kv_caches, self._batch(items), torch.empty(0, dtype=torch.long, device=dev))
            total += len(ids)
            todo = rest
        for s in seqs:
            s.draft_computed = s.num_computed
        return total


def make_drafter(cfg: SpecConfig, runner: Any) -> Drafter:
    if cfg.method == "self_draft":
        total = runner.model_config.num_layers
        layers = cfg.draft_layers or max(1, total // 3)
        if not 1 <= layers < total:
            raise EngineError(f"speculative.draft_layers must be 1..{total - 1} for this model, got {layers}",
                              "invalid_engine_args")
        return Drafter(runner.model, runner.kv_caches, layers, runner.block_size)
    assert cfg.draft_checkpoint is not None  # checked by SpecConfig.parse
    return ModelDrafter(resolve_checkpoint(cfg.draft_checkpoint), runner)
