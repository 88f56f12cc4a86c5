"""Reading a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) into plain tensors.

The adapter is never merged into the base weights: `adapters.py` adds its low-rank products per batch
segment, so the base and many adapters share one forward pass. What is read here is checked against the
base model (shapes, layer count, target modules) so a bad adapter is refused when it is registered,
never in the middle of a step. `modules_to_save` copies of `lm_head` and `embed_tokens` are kept whole
(vLLM refuses those adapters; we serve them per segment like the LoRA products).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ballast.engine.config import ModelConfig
from ballast.engine.errors import EngineError

MAX_RANK = 64
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SAVABLE = ("lm_head", "embed_tokens")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])"
                       r"(?:\.default)?\.weight$")
_SAVED_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?(lm_head|embed_tokens)(?:\.modules_to_save\.default)?"
                        r"\.weight$")


@dataclass
class LoraWeights:
    """One adapter on the CPU: per (layer, module) the pair (A [r, in], B [out, r] already scaled)."""

    path: Path
    rank: int
    pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save: whole weights

    def nbytes(self) -> int:
        ts = [t for p in self.pairs.values() for t in p] + list(self.saved.values())
        return sum(t.numel() * t.element_size() for t in ts)


def _bad(path: Path, why: str) -> EngineError:
    return EngineError(f"adapter {path.name}: {why}", "invalid_adapter")


def read_config(path: Path) -> dict[str, Any]:
    """adapter_config.json, refused where its settings change the math this engine does."""
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file() or not (path / "adapter_model.safetensors").is_file():
        raise _bad(path, "needs adapter_config.json and adapter_model.safetensors")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (ValueError, OSError) as e:
        raise _bad(path, f"adapter_config.json is not JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise _bad(path, "only PEFT LoRA adapters are supported")
    unsupported = {"use_dora": True, "fan_in_fan_out": True}
    for key, value in unsupported.items():
        if cfg.get(key) == value:
            raise _bad(path, f"{key}={value} is not supported")
    if cfg.get("bias", "none") != "none":
        raise _bad(path, "adapters with trained biases (bias != 'none') are not supported")
    if cfg.get("alpha_pattern"):
        raise _bad(path, "alpha_pattern is not supported")
    return cfg


def _scaling(cfg: dict[str, Any], rank: int) -> float:
    alpha = float(cfg.get("lora_alpha", rank))
    return alpha / (rank**0.5) if cfg.get("use_rslora") else alpha / rank


def _expected(mc: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each target module of the base model."""
    h, q, kv, i = mc.hidden_size, mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim, mc.intermediate_size
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (i, h),
            "up_proj": (i, h), "down_proj": (h, i)}


def read_adapter(path: Path, mc: ModelConfig, max_rank: int = MAX_RANK) -> LoraWeights:
    """The adapter at `path`, checked against the base model `mc`; EngineError("invalid_adapter") if unfit."""
    cfg = read_config(path)
    try:
        tensors = load_file(str(path / "adapter_model.safetensors"))
    except Exception as e:
        raise _bad(path, f"adapter_model.safetensors is unreadable ({type(e).__name__})") from None
    out = LoraWeights(path, 0)
    halves = _sort_keys(path, tensors, mc, out)
    shapes = _expected(mc)
    for (layer, module), ab in halves.items():
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None:
            raise _bad(path, f"layer {layer} {module} has only one of lora_A and lora_B")
        r = a.shape[0]
        if r > max_rank:
            raise _bad(path, f"rank {r} is above the engine's max_lora_rank {max_rank}")
        if (b.shape[0], a.shape[1]) != shapes[module] or b.shape[1] != r:
            raise _bad(path, f"layer {layer} {module} has shapes {tuple(a.shape)}, {tuple(b.shape)}, which do not "
                       "fit the base model")
        out.pairs[(layer, module)] = (a.contiguous(), (b * _scaling(cfg, r)).contiguous())
        out.rank = max(out.rank, r)
    if not out.pairs and not out.saved:
        raise _bad(path, "has no LoRA weights")
    return out


def _sort_keys(path: Path, tensors: dict[str, torch.Tensor], mc: ModelConfig,
               out: LoraWeights) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """LoRA halves by (layer, module); modules_to_save weights (shape-checked) into `out.saved`."""
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if m := _LORA_KEY.match(key):
            layer, module, ab = int(m[1]), m[2], m[3]
            if module not in TARGETS or layer >= mc.num_layers:
                raise _bad(path, f"{key}: no such target module in the base model")
            halves.setdefault((layer, module), {})[ab] = t.float()
        elif m := _SAVED_KEY.match(key):
            if tuple(t.shape) != (mc.vocab_size, mc.hidden_size):
                raise _bad(path, f"modules_to_save {m[1]} has shape {tuple(t.shape)}, expected "
                           f"{(mc.vocab_size, mc.hidden_size)}")
            out.saved[m[1]] = t.float()
        else:
            raise _bad(path, f"{key}: only LoRA weights of {', '.join(TARGETS)} and modules_to_save "
                       f"{', '.join(SAVABLE)} are supported")
    return halves
