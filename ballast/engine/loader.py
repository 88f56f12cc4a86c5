"""Loading Hugging Face safetensors into the engine's model tensor by tensor, fusing q/k/v and gate/up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ballast.engine.errors import EngineError
from ballast.engine.models.llama import LlamaModel


def load_weights(model: LlamaModel, path: Path) -> None:
    """Load HF safetensors, fusing q/k/v and gate/up as they are read."""
    w = _Weights(model, path)
    w.put("embed_tokens.weight", w.get("embed_tokens.weight"))
    w.put("norm.weight", w.get("norm.weight"))
    own_head = "lm_head.weight" in w.where and not model.cfg.tie_word_embeddings
    w.put("lm_head.weight", w.get("lm_head.weight" if own_head else "embed_tokens.weight"))
    for i in range(model.cfg.num_layers):
        w.load_layer(i)
    missing = set(w.params) - w.loaded
    if missing:
        raise EngineError(f"{path}: weights missing for {sorted(missing)[:5]}")


class _Weights:
    """Checkpoint names indexed to their file, each tensor read only when it is copied in: peak memory is
    the model plus one (fused) tensor, not the model plus every weight at once."""

    def __init__(self, model: LlamaModel, path: Path):
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise EngineError(f"{path}: no *.safetensors weights")
        self.model = model
        self.path = path
        self.where: dict[str, tuple[Any, str]] = {}
        for sf in [safe_open(str(f), framework="pt") for f in files]:
            for name in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                self.where[name.removeprefix("model.")] = (sf, name)
        self.params = dict(model.named_parameters())
        self.loaded: set[str] = set()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise EngineError(f"{self.path}: weight {name} is missing")
        sf, full = self.where[name]
        return sf.get_tensor(full)

    def put(self, name: str, value: torch.Tensor) -> None:
        p = self.params[name]
        if p.shape != value.shape:
            raise EngineError(
                f"{self.path}: weight {name} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(value.to(p.dtype))
        self.loaded.add(name)

    def load_layer(self, i: int) -> None:
        """Decoder layer `i`: q/k/v and gate/up fused as the model holds them; bias and q/k norms if the
        architecture has them."""
        cfg, get, put = self.model.cfg, self.get, self.put
        pre = f"layers.{i}."
        a = pre + "self_attn."
        put(a + "qkv.weight", torch.cat([get(a + f"{x}_proj.weight") for x in "qkv"]))
        if cfg.attention_bias:
            put(a + "qkv.bias", torch.cat([get(a + f"{x}_proj.bias") for x in "qkv"]))
        put(a + "o_proj.weight", get(a + "o_proj.weight"))
        if cfg.qk_norm:
            put(a + "q_norm.weight", get(a + "q_norm.weight"))
            put(a + "k_norm.weight", get(a + "k_norm.weight"))
        m = pre + "mlp."
        put(m + "gate_up.weight", torch.cat([get(m + "gate_proj.weight"), get(m + "up_proj.weight")]))
        put(m + "down_proj.weight", get(m + "down_proj.weight"))
        put(pre + "input_layernorm.weight", get(pre + "input_layernorm.weight"))
        put(pre + "post_attention_layernorm.weight", get(pre + "post_attention_layernorm.weight"))
