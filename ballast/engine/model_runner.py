"""The model runner: owns the model, the paged KV cache tensors and the device; turns one scheduled step
into a flat batch, runs the forward pass and samples.

A step's tokens are laid out decode tokens first (rows 0..nd-1, so attention reads them as a view),
then each prefill chunk. Logits are computed only for the rows that sample.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ballast.engine.adapters import AdapterManager, LoraRef
from ballast.engine.config import EngineArgs, ModelConfig
from ballast.engine.layers import AttentionBatch, PrefillChunk
from ballast.engine.loader import load_weights
from ballast.engine.models import LlamaModel
from ballast.engine.sampler import sample
from ballast.engine.scheduler import ScheduledSeq
from ballast.engine.sequence import Sequence
from ballast.engine.speculative import verify

log = logging.getLogger("ballast.engine")


@dataclass
class StepResult:
    """What one step produced: sampled sequences with their tokens (and logprob rows), and per-request
    sampling failures."""

    seqs: list[Sequence]
    tokens: list[int]
    logprobs: torch.Tensor | list[torch.Tensor | None] | None
    errors: dict[str, BaseException]
    extra: dict[int, list[int]] = field(default_factory=dict)  # speculative: index in seqs -> tokens emitted


class ModelRunner:
    def __init__(self, args: EngineArgs, model_config: ModelConfig, path: Path):
        self.device = args.torch_device()
        self.dtype = args.torch_dtype(self.device)
        if self.device.type == "cpu":  # one intra-op thread per core this process may run on
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            torch.set_num_threads(args.num_threads or max(1, cores or 1))
        mc = self.model_config = model_config
        with torch.device(self.device):
            self.model = LlamaModel(mc).to(self.dtype)
        load_weights(self.model, path)
        self.model.eval()
        bs = self.block_size = args.block_size
        per_block = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * bs * torch.finfo(self.dtype).bits // 8
        self.num_blocks = max(1, args.kv_cache_bytes // per_block)
        # Per layer: [num_blocks, block_size, 2 (k, v), kv_heads, head_dim]. Whole blocks, K and V together,
        # are gathered with one index_select per layer into a reused workspace (see layers.py).
        shape = (self.num_blocks, bs, 2, mc.num_kv_heads, mc.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(mc.num_layers)]
        self._workspace = torch.empty((0, *shape[1:]), dtype=self.dtype, device=self.device)
        self.adapters: AdapterManager | None = None  # set by the engine when LoRA is on (it wraps the model)
        self._owners: list[tuple[int, int, LoraRef | None]] = []  # token ranges of each sequence in a step

    def _workspace_for(self, num_blocks: int) -> torch.Tensor:
        if self._workspace.shape[0] < num_blocks:
            self._workspace = torch.empty((max(num_blocks, 2 * self._workspace.shape[0]), *self._workspace.shape[1:]),
                                          dtype=self.dtype, device=self.device)
        return self._workspace

    def _prepare(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch,
                                                                 list[int], list[Sequence], list[ScheduledSeq]]:
        """Flatten one step: plain decode tokens first (rows 0..nd-1), then each prefill chunk, then each
        speculative chunk (a decode token and its drafts), whose logits rows all come after the others'."""
        bs = self.block_size
        decodes = [s for s in scheduled if s.num_tokens == 1 and s.seq.num_computed > 0 and not s.draft]
        others = [s for s in scheduled if not (s.num_tokens == 1 and s.seq.num_computed > 0) or s.draft]
        owners = self._owners = []
        if self.adapters is not None:  # each adapter's decodes side by side: one LoRA segment each
            decodes.sort(key=lambda s: s.seq.lora.uid if s.seq.lora is not None else 0)
            owners.extend((i, i + 1, s.seq.lora) for i, s in enumerate(decodes))
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        rows: list[int] = []
        seqs: list[Sequence] = []
        dev = self.device
        nd = len(decodes)
        ws_blocks = 0
        decode_blocks = decode_mask = None
        if nd:
            lens = []
            tables = []
            for i, sch in enumerate(decodes):
                seq = sch.seq
                p = seq.num_computed
                ids.append(seq.token_ids[p])
                pos.append(p)
                table = seq.block_table
                slots.append(table[p // bs] * bs + p % bs)
                lens.append(p + 1)
                tables.append(table)
                if sch.samples:
                    rows.append(i)
                    seqs.append(seq)
            nblk = -(-max(lens) // bs)
            padded = [t[:nblk] + [0] * (nblk - min(len(t), nblk)) for t in tables]
            decode_blocks = torch.tensor(padded, dtype=torch.long).view(-1).to(dev)
            lens_t = torch.tensor(lens)
            decode_mask = (torch.arange(nblk * bs)[None, :] < lens_t[:, None])[:, None, None, :].to(dev)
            ws_blocks = nd * nblk
        prefills: list[PrefillChunk] = []
        # Whole prompts of equal length with nothing cached are adjacent, so attention takes them as one batch.
        others.sort(key=lambda s: (bool(s.draft), s.seq.num_computed > 0, s.num_tokens))
        spec_rows: list[int] = []
        for sch in others:
            start = len(ids)
            ws_blocks = max(ws_blocks, self._add_chunk(sch, ids, pos, slots, prefills))
            n = len(ids) - start
            owners.append((start, start + n, sch.seq.lora))
            if sch.draft:
                spec_rows.extend(range(start, start + n))
            elif sch.samples:
                rows.append(start + n - 1)
                seqs.append(sch.seq)
        batch = AttentionBatch(torch.tensor(slots, dtype=torch.long, device=dev), nd, decode_blocks, decode_mask,
                               prefills, self._workspace_for(ws_blocks) if ws_blocks else None)
        return (torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev),
                batch, rows + spec_rows, seqs, [s for s in others if s.draft])

    def _add_chunk(self, sch: ScheduledSeq, ids: list[int], pos: list[int], slots: list[int],
                   prefills: list[PrefillChunk]) -> int:
        """One prefill chunk (or speculative chunk) into the flat batch; returns the context blocks it reads."""
        bs = self.block_size
        seq = sch.seq
        s0 = seq.num_computed
        toks = seq.token_ids[s0 : s0 + sch.num_tokens] + sch.draft
        n = len(toks)
        start = len(ids)
        ids.extend(toks)
        pos.extend(range(s0, s0 + n))
        table = seq.block_table
        slots.extend(table[p // bs] * bs + p % bs for p in range(s0, s0 + n))
        ctx = None
        nblk = 0
        if s0 > 0:
            nblk = -(-(s0 + n) // bs)
            ctx = torch.tensor(table[:nblk], dtype=torch.long, device=self.device)
        last = prefills[-1] if prefills else None
        if (ctx is None and last is not None and last.context_blocks is None
                and last.end - last.start == last.count * n):
            last.end += n
            last.count += 1
        else:
            prefills.append(PrefillChunk(start, start + n, ctx, s0 + n, s0))
        return nblk

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq]) -> StepResult:
        """One forward pass over the step, then sampling; returns the sequences that sampled, their tokens
        and logprobs, and the requests whose row could not be sampled."""
        ids, pos, batch, rows, seqs, spec = self._prepare(scheduled)
        if self.adapters is not None:
            self.adapters.begin_step(self._owners, ids.shape[0], rows)
        try:
            logits = self.model(ids, pos, self.kv_caches, batch,
                                torch.tensor(rows, dtype=torch.long, device=self.device))
        finally:
            if self.adapters is not None:
                self.adapters.end_step()
        if spec:
            logits, spec_logits = logits[: len(seqs)], logits[len(seqs) :]
        if not seqs:
            return self._verify(StepResult([], [], None, {}), spec, spec_logits if spec else logits)
        try:
            tokens, logprobs = sample(logits, seqs)
            return self._verify(StepResult(seqs, tokens, logprobs, {}), spec, spec_logits if spec else logits)
        except Exception:
            log.warning("batched sampling failed; sampling row by row to find the request at fault", exc_info=True)
        # A request's own parameters can break sampling (a NaN distribution): one row at a time, so it fails
        # alone and the rest of the batch still gets its tokens.
        result = StepResult([], [], [], {})
        for i, seq in enumerate(seqs):
            try:
                tok, lp = sample(logits[i : i + 1], [seq])
            except Exception as e:
                result.errors[seq.request_id] = e
                continue
            result.seqs.append(seq)
            result.tokens.append(tok[0])
            result.logprobs.append(lp[0] if lp is not None else None)  # type: ignore[union-attr]
        return self._verify(result, spec, spec_logits if spec else logits)

    def _verify(self, result: StepResult, spec: list[ScheduledSeq], logits: torch.Tensor) -> StepResult:
        """Speculative rows: the accepted drafts and one more token per sequence, appended to `result`
        (`result.extra[i]` holds all of sequence i's tokens); a failure fails its request alone."""
        row = 0
        for sch in spec:
            n = len(sch.draft) + 1
            try:
                toks = verify(logits[row : row + n], sch.seq, sch.draft, sch.draft_probs)
            except Exception as e:
                result.errors[sch.seq.request_id] = e
            else:
                result.extra[len(result.seqs)] = toks
                result.seqs.append(sch.seq)
                result.tokens.append(toks[0])
            row += n
        return result
