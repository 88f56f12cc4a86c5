"""Loading Hugging Face safetensors into the engine's model, fusing q/k/v and gate/up as they are read."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ballast.engine.config import EngineError
from ballast.engine.models.llama import LlamaModel


def load_weights(model: LlamaModel, path: Path) -> None:
    """Load HF safetensors, fusing q/k/v and gate/up as they are read."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise EngineError(f"{path}: no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[name.removeprefix("model.")] = sf.get_tensor(name)
    params = dict(model.named_parameters())
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
    put("lm_head.weight", lm if lm is not None and not model.cfg.tie_word_embeddings
        else tensors["embed_tokens.weight"])
    for i in range(model.cfg.num_layers):
        pre = f"layers.{i}."
        a = pre + "self_attn."
        put(a + "qkv.weight", torch.cat([tensors[a + f"{x}_proj.weight"] for x in "qkv"]))
        if model.cfg.attention_bias:
            put(a + "qkv.bias", torch.cat([tensors[a + f"{x}_proj.bias"] for x in "qkv"]))
        put(a + "o_proj.weight", tensors[a + "o_proj.weight"])
        if model.cfg.qk_norm:
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
