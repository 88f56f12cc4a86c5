"""Model drafts for speculative decoding: k cheap autoregressive decode steps per proposal.

`self_draft` (LayerSkip, Draft & Verify): the target's own first layers, then its final norm and LM head.
Those layers compute exactly what the target computes for the same tokens, so the draft reads the
target's KV cache for them and needs no cache or prefill of its own; its writes past the computed
length are overwritten by the verifying forward. `draft_model`: a second checkpoint with the target's
tokenizer, with its own KV cache indexed by the target's block tables. It runs every target forward
too (a mirror), so its cache always holds the same tokens as the target's, prefix-cache hits and
preemptions included.

Sampled rows draw their drafts from the draft's own sampling distribution q and keep q, which
rejection sampling needs; greedy rows take the argmax.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ballast.engine.checkpoints import resolve_checkpoint
from ballast.engine.config import ModelConfig
from ballast.engine.errors import EngineError
from ballast.engine.layers import AttentionBatch
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

    def _workspace(self, blocks: int) -> torch.Tensor:
        if self.workspace.shape[0] < blocks:
            self.workspace = torch.empty((max(blocks, 2 * self.workspace.shape[0]), *self.workspace.shape[1:]),
                                         dtype=self.workspace.dtype, device=self.workspace.device)
        return self.workspace

    def _decode_batch(self, seqs: list[Sequence], positions: list[int]) -> AttentionBatch:
        bs, dev = self.block_size, self.workspace.device
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions, strict=True)]
        nblk = -(-(max(positions) + 1) // bs)
        padded = [s.block_table[:nblk] + [0] * (nblk - min(len(s.block_table), nblk)) for s in seqs]
        lens = torch.tensor(positions) + 1
        mask = (torch.arange(nblk * bs)[None, :] < lens[:, None])[:, None, None, :].to(dev)
        return AttentionBatch(torch.tensor(slots, dtype=torch.long, device=dev), len(seqs),
                              torch.tensor(padded, dtype=torch.long).view(-1).to(dev), mask, [],
                              self._workspace(len(seqs) * nblk))

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
            logits = self.model(torch.tensor(tokens, dtype=torch.long, device=dev),
                                torch.tensor(positions, dtype=torch.long, device=dev), self.kv_caches,
                                self._decode_batch(seqs, positions), rows, num_layers=self.num_layers)
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
    """A draft checkpoint with its own KV cache, kept in step with the target's by mirroring its forwards."""

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
        runner.mirrors.append(self.mirror)

    @torch.inference_mode()
    def mirror(self, ids: torch.Tensor, pos: torch.Tensor, batch: AttentionBatch) -> None:
        """Run the target's step through the draft model, so its cache holds the same tokens."""
        ws = self._workspace(batch.workspace.shape[0]) if batch.workspace is not None else None
        rows = torch.empty(0, dtype=torch.long, device=ids.device)
        self.model(ids, pos, self.kv_caches, dataclasses.replace(batch, workspace=ws), rows)


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
