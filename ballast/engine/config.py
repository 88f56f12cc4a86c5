"""Engine settings (`EngineArgs`) and the model's architecture (`ModelConfig`, read from config.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ballast.engine.errors import EngineError

__all__ = ["EngineArgs", "EngineError", "ModelConfig", "generation_defaults", "parse_bytes"]

# generation_config.json keys a request inherits when it omits them (vLLM does the same).
_GENERATION_KEYS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float,
                    "repetition_penalty": float, "max_new_tokens": int}
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
          "Ti": 2**40}


def parse_bytes(value: str | int) -> int:
    """`"512Mi"`, `"2G"` or a byte count → bytes (the engine's own, so it does not import `ballast.config`)."""
    if isinstance(value, int):
        return value
    text = value.strip().removesuffix("B")
    unit = text.lstrip("0123456789.")
    try:
        return int(float(text[: len(text) - len(unit)]) * _UNITS[unit.strip()])
    except (KeyError, ValueError):
        raise ValueError(f"{value!r} is not a memory size; use a number with a unit such as 512Mi or 2Gi") from None


def generation_defaults(path: Path) -> dict[str, Any]:
    """Sampling defaults from the checkpoint's generation_config.json (none when it has no such file)."""
    gen = path / "generation_config.json"
    if not gen.exists():
        return {}
    raw = json.loads(gen.read_text())
    out: dict[str, Any] = {}
    for key, kind in _GENERATION_KEYS.items():
        value = raw.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out["max_tokens" if key == "max_new_tokens" else key] = kind(value)
    return out


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        c = json.loads((path / "config.json").read_text())
        text = c.get("text_config", c)
        mt = text.get("model_type", "llama")
        supported = {"llama", "mistral", "qwen2", "qwen3"}
        if mt not in supported:
            raise EngineError(f"{path}: model_type {mt!r} is not supported (supported: {sorted(supported)})")
        heads = text["num_attention_heads"]
        rope = text.get("rope_parameters") or {}
        theta = text.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = text.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        eos = text.get("eos_token_id")
        gen = path / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id", eos)
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(
            model_type=mt,
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=text.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            attention_bias=bool(text.get("attention_bias", mt == "qwen2")),
            qk_norm=mt == "qwen3",
            eos_token_ids=eos_ids,
            bos_token_id=text.get("bos_token_id"),
        )


@dataclass
class EngineArgs:
    checkpoint: str
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_bytes: int = 1 << 30
    block_size: int = 16
    dtype: str = "auto"
    enable_prefix_caching: bool = True
    device: str = "auto"
    served_model_name: str | None = None
    kv_cache_memory: str | int | None = None  # "1Gi", "512Mi" or bytes; overrides kv_cache_bytes
    # CPU: torch intra-op threads (None: one per core this process may run on). On a CPU shared with other
    # busy processes, fewer threads than cores avoids OpenMP barrier stalls (measured: 1 thread 5x faster
    # than 2 on a 2-core machine under load).
    num_threads: int | None = None
    # Sampling defaults for requests that omit a parameter; they override generation_config.json.
    default_sampling: dict[str, Any] = field(default_factory=dict)
    # Bound of max_tokens when neither the request nor the defaults set it (and the context allows).
    default_max_tokens: int = 1024
    # No step for this long while work waits: the engine counts as stuck (unhealthy).
    stall_timeout_s: float = 120.0
    # LoRA adapters (`adapters.py`): on when enable_lora or any adapter is given; {name: adapter directory}.
    enable_lora: bool = False
    adapters: dict[str, str] = field(default_factory=dict)
    max_loras: int = 4  # adapters in device slots at once (distinct adapters in one batch)
    max_cpu_loras: int = 32  # adapters kept read in CPU memory; more may be registered
    max_lora_rank: int = 64
    # Speculative decoding (speculative.SpecConfig as a dict: method, num_tokens, ...); None: off.
    speculative: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kv_cache_memory is not None:
            try:
                self.kv_cache_bytes = parse_bytes(self.kv_cache_memory)
            except ValueError as e:
                raise EngineError(str(e), "invalid_engine_args") from e
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_bytes", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise EngineError(f"{name} must be positive, got {getattr(self, name)}", "invalid_engine_args")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            # bf16 on CUDA; fp32 on CPU, where these CPUs lack fast bf16 matmul.
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]
