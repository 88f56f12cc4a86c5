"""Model building blocks: RMSNorm, rotary embeddings with their scaling variants, and attention over
the paged KV cache.

The KV cache of a layer is one tensor [num_blocks, block_size, 2 (k, v), kv_heads, head_dim]. On CPU,
gathering scattered tokens for SDPA is what makes paging costly (measured: an advanced-indexing gather
of token slots costs about twice the attention itself at batch 32). Gathering whole blocks, K and V
together, with one `index_select` per layer into a workspace reused across layers and steps costs
about a quarter of the attention, so the paged path stays close to a contiguous cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ballast.engine.config import ModelConfig
from ballast.engine.errors import EngineError


@dataclass
class PrefillChunk:
    start: int  # offset of the chunk's tokens in the flat batch
    end: int
    context_blocks: torch.Tensor | None  # [nblk] blocks of the whole context so far (None: no cached prefix)
    context_len: int  # tokens of context including this chunk
    first_pos: int  # position of the chunk's first token
    count: int = 1  # > 1: that many whole prompts of equal length and no cached context, attended as one batch


@dataclass
class AttentionBatch:
    """How one step's flat batch of tokens attends over the paged cache.

    Decode tokens come first in the flat batch (rows 0..num_decodes-1), so they are a view, not a gather.
    Their contexts are gathered block by block (`index_select` of whole blocks into a reused workspace,
    one copy of K and V together per layer) into a padded [num_decodes, L] batch for one SDPA call.
    """

    slot_mapping: torch.Tensor  # [T] where each token's K/V is written
    num_decodes: int
    decode_blocks: torch.Tensor | None  # [num_decodes * nblk] block table, padded, flattened
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, nblk * block_size] True where attended
    prefills: list[PrefillChunk]
    workspace: torch.Tensor | None = None  # [>= blocks gathered, block_size, 2, kvh, d]


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies with the checkpoint's RoPE scaling (default, linear, dynamic, llama3)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    pos_scale = 1.0
    if kind == "linear":
        pos_scale = 1.0 / float(sc["factor"])
    elif kind == "dynamic":
        # NTK-aware, applied statically for the scaled context (as vLLM does; HF rescales per length).
        factor = float(sc["factor"])
        base = cfg.rope_theta * ((factor * factor - (factor - 1)) ** (dim / (dim - 2)))
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    elif kind == "llama3":
        factor = float(sc["factor"])
        low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
        old = float(sc.get("original_max_position_embeddings", 8192))
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = torch.where(is_mid, mid, scaled)
    elif kind not in ("default", None):
        raise EngineError(f"rope scaling {kind!r} is not supported")
    return inv.float(), pos_scale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, d]; cos, sin: [T, d]."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * c + rotate_half(x) * s


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    batch: AttentionBatch, scale: float) -> torch.Tensor:
    """Write this step's k/v into the cache, then attend. q: [T, h, d]; k, v: [T, kvh, d]; returns [T, h, d]."""
    h, d = q.shape[1], q.shape[2]
    kvh = k.shape[1]
    kv_cache.view(-1, 2, kvh, d).index_copy_(0, batch.slot_mapping, torch.stack((k, v), dim=1))
    gqa = h != kvh
    nd = batch.num_decodes
    # All decodes: the attention output is returned as is below, so `out` is never written (no allocation).
    out = torch.empty_like(q) if batch.prefills else q
    if nd:
        blocks, workspace = batch.decode_blocks, batch.workspace
        assert blocks is not None and workspace is not None  # set whenever there are decodes
        ws = workspace[: blocks.shape[0]]
        torch.index_select(kv_cache, 0, blocks, out=ws)
        ctx = ws.view(nd, -1, 2, kvh, d)
        o = F.scaled_dot_product_attention(
            q[:nd].unsqueeze(2), ctx[:, :, 0].transpose(1, 2), ctx[:, :, 1].transpose(1, 2),
            attn_mask=batch.decode_mask, scale=scale, enable_gqa=gqa,
        ).squeeze(2)  # [nd, h, d]
        if not batch.prefills:
            return o
        out[:nd] = o
    for p in batch.prefills:
        if p.count > 1:
            g = p.count
            qs, ks, vs = (x[p.start : p.end].view(g, -1, x.shape[1], d).transpose(1, 2) for x in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
            out[p.start : p.end] = o.transpose(1, 2).reshape(-1, h, d)
            continue
        qs = q[p.start : p.end].transpose(0, 1).unsqueeze(0)  # [1, h, n, d]
        if p.context_blocks is None:
            ks = k[p.start : p.end].transpose(0, 1).unsqueeze(0)
            vs = v[p.start : p.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            assert batch.workspace is not None  # set whenever a prefill reads cached context
            ws = batch.workspace[: p.context_blocks.shape[0]]
            torch.index_select(kv_cache, 0, p.context_blocks, out=ws)
            ctx = ws.view(-1, 2, kvh, d)[: p.context_len]
            ks = ctx[:, 0].transpose(0, 1).unsqueeze(0)
            vs = ctx[:, 1].transpose(0, 1).unsqueeze(0)
            n = p.end - p.start
            qpos = torch.arange(p.first_pos, p.first_pos + n, device=q.device)
            mask = torch.arange(p.context_len, device=q.device)[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[p.start : p.end] = o.squeeze(0).transpose(0, 1)
    return out
