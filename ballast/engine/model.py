"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) over a paged KV cache.

All tokens of a step, prefill chunks and decodes alike, go through the linear layers as one flat
batch. Attention reads keys and values from the paged cache: decodes are batched into one SDPA call
over their gathered blocks; each prefill chunk is one causal SDPA call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ballast.engine.config import EngineError, ModelConfig


@dataclass
class PrefillChunk:
    start: int  # offset of the chunk's tokens in the flat batch
    end: int
    context_slots: torch.Tensor | None  # slots of the whole context so far (None: no cached prefix)
    first_pos: int  # position of the chunk's first token


@dataclass
class AttentionBatch:
    slot_mapping: torch.Tensor  # [T] where each token's K/V is written
    decode_rows: torch.Tensor | None  # [B] rows of decode tokens in the flat batch
    decode_slots: torch.Tensor | None  # [B, L] context slots per decode (padded)
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] True where attended
    prefills: list[PrefillChunk]


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
        # NTK-aware: a larger base, applied statically for the configured context.
        factor = float(sc["factor"])
        base = cfg.rope_theta * (factor ** (dim / (dim - 2)))
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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        batch: AttentionBatch,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv(x)
        q, k, v = qkv.split([self.h * self.d, self.kvh * self.d, self.kvh * self.d], dim=-1)
        q = q.view(t, self.h, self.d)
        k = k.view(t, self.kvh, self.d)
        v = v.view(t, self.kvh, self.d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        k_cache[batch.slot_mapping] = k
        v_cache[batch.slot_mapping] = v
        out = torch.empty_like(q)
        if batch.decode_rows is not None:
            rows = batch.decode_rows
            qd = q[rows].unsqueeze(2)  # [B, h, 1, d]
            kd = k_cache[batch.decode_slots].transpose(1, 2)  # [B, kvh, L, d]
            vd = v_cache[batch.decode_slots].transpose(1, 2)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=batch.decode_mask, scale=self.scale,
                                               enable_gqa=self.h != self.kvh)
            out[rows] = o.squeeze(2)
        for p in batch.prefills:
            qs = q[p.start : p.end].transpose(0, 1).unsqueeze(0)  # [1, h, n, d]
            if p.context_slots is None:
                ks = k[p.start : p.end].transpose(0, 1).unsqueeze(0)
                vs = v[p.start : p.end].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale,
                                                   enable_gqa=self.h != self.kvh)
            else:
                ks = k_cache[p.context_slots].transpose(0, 1).unsqueeze(0)
                vs = v_cache[p.context_slots].transpose(0, 1).unsqueeze(0)
                n, ctx = p.end - p.start, p.context_slots.shape[0]
                qpos = torch.arange(p.first_pos, p.first_pos + n, device=x.device)
                mask = torch.arange(ctx, device=x.device)[None, :] <= qpos[:, None]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale,
                                                   enable_gqa=self.h != self.kvh)
            out[p.start : p.end] = o.squeeze(0).transpose(0, 1)
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
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        batch: AttentionBatch, logits_rows: torch.Tensor,
    ) -> torch.Tensor:
        """Returns logits (float32) for `logits_rows` of the flat batch only."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, h.dtype)
        for layer, (kc, vc) in zip(self.layers, kv_caches, strict=True):
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, kc, vc, batch)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.norm(h[logits_rows])
        return self.lm_head(h).float()

    # ---- weights ---------------------------------------------------------------------------
    def load_checkpoint(self, path: Path) -> None:
        """Load HF safetensors, fusing q/k/v and gate/up as they are read."""
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise EngineError(f"{path}: no *.safetensors weights")
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensors[name.removeprefix("model.")] = sf.get_tensor(name)
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def put(name: str, value: torch.Tensor) -> None:
            p = params[name]
            if p.shape != value.shape:
                raise EngineError(f"{path}: weight {name} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(value.to(p.dtype))
            loaded.add(name)

        put("embed_tokens.weight", tensors["embed_tokens.weight"])
        put("norm.weight", tensors["norm.weight"])
        lm = tensors.get("lm_head.weight")
        put("lm_head.weight", lm if lm is not None and not self.cfg.tie_word_embeddings
            else tensors["embed_tokens.weight"])
        for i in range(self.cfg.num_layers):
            pre = f"layers.{i}."
            a = pre + "self_attn."
            put(a + "qkv.weight", torch.cat([tensors[a + f"{x}_proj.weight"] for x in "qkv"]))
            if self.cfg.attention_bias:
                put(a + "qkv.bias", torch.cat([tensors[a + f"{x}_proj.bias"] for x in "qkv"]))
            put(a + "o_proj.weight", tensors[a + "o_proj.weight"])
            if self.cfg.qk_norm:
                put(a + "q_norm.weight", tensors[a + "q_norm.weight"])
                put(a + "k_norm.weight", tensors[a + "k_norm.weight"])
            m = pre + "mlp."
            put(m + "gate_up.weight", torch.cat([tensors[m + "gate_proj.weight"], tensors[m + "up_proj.weight"]]))
            put(m + "down_proj.weight", tensors[m + "down_proj.weight"])
            put(pre + "input_layernorm.weight", tensors[pre + "input_layernorm.weight"])
            put(pre + "post_attention_layernorm.weight", tensors[pre + "post_attention_layernorm.weight"])
        missing = set(params) - loaded
        if missing:
            raise EngineError(f"{path}: weights missing for {sorted(missing)[:5]}")
