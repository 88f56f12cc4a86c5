"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) over the paged KV cache.

All tokens of a step, prefill chunks and decodes alike, go through the linear layers as one flat
batch (q/k/v and gate/up fused); attention reads the paged cache (`layers.paged_attention`).
Qwen2 adds q/k/v biases, Qwen3 per-head q/k RMSNorm; tied embeddings share the embedding matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ballast.engine.config import ModelConfig
from ballast.engine.layers import AttentionBatch, RMSNorm, apply_rope, paged_attention, rope_inv_freq


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.kvh, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, (self.h + 2 * self.kvh) * self.d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = self.d**-0.5

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv(x)
        q, k, v = qkv.split([self.h * self.d, self.kvh * self.d, self.kvh * self.d], dim=-1)
        q = q.view(t, self.h, self.d)
        k = k.view(t, self.kvh, self.d)
        v = v.view(t, self.kvh, self.d)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = paged_attention(q, k, v, kv_cache, batch, self.scale)
        return self.o_proj(out.reshape(t, self.h * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class LlamaModel(nn.Module):
    inv_freq: torch.Tensor  # a registered buffer

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv, self.pos_scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv, persistent=False)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = (positions.float() * self.pos_scale)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
        batch: AttentionBatch, logits_rows: torch.Tensor, num_layers: int | None = None,
    ) -> torch.Tensor:
        """Returns logits (float32) for `logits_rows` of the flat batch only. `num_layers`: exit after that
        many layers (a self-draft for speculative decoding, see drafter.py)."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, h.dtype)
        n = len(self.layers) if num_layers is None else num_layers
        for layer, kv in zip(cast("Sequence[Layer]", self.layers)[:n], kv_caches[:n], strict=True):
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, kv, batch)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.norm(h[logits_rows])
        return self.lm_head(h).float()
