"""`make_lora`: a small PEFT LoRA adapter for a base checkpoint, made offline (tests and benchmarks).

Random by default: A and B are both drawn (PEFT's own init leaves B at zero, an adapter that changes
nothing), with B scaled from the base weight it adapts so each product is about 30% of the base output:
visible in greedy outputs, yet the model stays coherent. With `train_steps`, PEFT then trains it for a
few steps on text generated here (needs the `peft` package).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ballast.engine.checkpoints import resolve_checkpoint
from ballast.engine.errors import EngineError
from ballast.engine.lora import TARGETS
from ballast.engine.tools.common import atomic_dir, publish, write_json

_WORDS = ("the", "adapter", "learns", "a", "new", "voice", "for", "short", "answers", "about", "ships", "rivers",
          "stars", "and", "numbers")


def _base_weights(base: Path) -> dict[str, tuple[object, str]]:
    where: dict[str, tuple[object, str]] = {}
    for f in sorted(base.glob("*.safetensors")):
        sf = safe_open(str(f), framework="pt")
        for name in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
            where[name.removeprefix("model.")] = (sf, name)
    return where


def _config(base: Path, rank: int, alpha: float, targets: list[str], save: list[str]) -> dict[str, object]:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": rank,
            "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": targets, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "modules_to_save": save or None, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {}}


def make_lora(base: str | Path, out: str | Path, *, rank: int = 8, alpha: float = 16.0, seed: int = 0,
              targets: list[str] | None = None, modules_to_save: list[str] | None = None,
              train_steps: int = 0) -> Path:
    """Write a PEFT LoRA adapter for the checkpoint `base` into `out`; returns `out`."""
    base_dir = resolve_checkpoint(str(base))
    targets = list(targets or TARGETS)
    save = list(modules_to_save or [])
    bad = [t for t in targets if t not in TARGETS] + [m for m in save if m not in ("lm_head", "embed_tokens")]
    if bad or not 1 <= rank <= 64:
        raise EngineError(f"make-lora: rank must be 1..64 and targets among {TARGETS}; got rank {rank}, {bad}")
    config = json.loads((base_dir / "config.json").read_text())
    layers = int(config["num_hidden_layers"])
    g = torch.Generator().manual_seed(seed)
    where = _base_weights(base_dir)
    scale = alpha / rank
    tensors: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for module in targets:
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            sf, full = where[f"layers.{i}.{part}.{module}.weight"]
            w = sf.get_tensor(full).float()  # type: ignore[attr-defined]
            dout, din = w.shape
            b_std = 0.3 * float(w.std()) * din**0.5 / (rank**0.5 * scale)
            key = f"base_model.model.model.layers.{i}.{part}.{module}"
            tensors[key + ".lora_A.weight"] = torch.randn(rank, din, generator=g) / din**0.5
            tensors[key + ".lora_B.weight"] = torch.randn(dout, rank, generator=g) * b_std
    for module in save:
        name = "lm_head.weight" if "lm_head.weight" in where and module == "lm_head" else "embed_tokens.weight"
        sf, full = where[name]
        w = sf.get_tensor(full).float()  # type: ignore[attr-defined]
        prefix = "base_model.model." if module == "lm_head" else "base_model.model.model."
        tensors[f"{prefix}{module}.weight"] = w + torch.randn(w.shape, generator=g) * float(w.std()) * 0.5
    target = Path(out)
    tmp = atomic_dir(target)
    write_json(tmp / "adapter_config.json", _config(base_dir, rank, alpha, targets, save))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    if train_steps > 0:
        _train(base_dir, tmp, train_steps, seed)
    publish(tmp, target)
    return target


def _train(base: Path, adapter: Path, steps: int, seed: int) -> None:
    """A few PEFT training steps on generated text, saved over the random adapter."""
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise EngineError("--train-steps needs the peft package (pip install 'ballast[dev]')",
                          "missing_dependency") from None
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()
    for _ in range(steps):
        text = " ".join(rng.choice(_WORDS) for _ in range(32))
        batch = tok(text, return_tensors="pt")
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(str(adapter))
