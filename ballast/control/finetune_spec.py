"""A fine-tuning job request as OpenAI's API shapes it (`method`, legacy `hyperparameters`, `suffix`, `seed`,
`metadata`) plus Ballast's `ballast` extension, checked field by field: every refusal is a 400 naming the field.

Training files are checked line by line (supervised: OpenAI's chat format, the same `check_example` dataset
imports use; dpo: OpenAI's preference format) and normalised into what the worker reads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ballast.control.datasets import check_example
from ballast.control.errors import ControlError

FIELDS = {"model", "training_file", "validation_file", "method", "hyperparameters", "suffix", "seed", "metadata",
          "integrations", "ballast"}
# name: (low, high, auto value, integer?)
HYPER = {"n_epochs": (1, 50, 3, True), "batch_size": (1, 256, 4, True),
         "learning_rate_multiplier": (1e-6, 100.0, 1.0, False), "beta": (1e-6, 2.0, 0.1, False)}
METHOD_HYPER = {"supervised": ("n_epochs", "batch_size", "learning_rate_multiplier"),
                "dpo": ("n_epochs", "batch_size", "learning_rate_multiplier", "beta")}
GATE = {"dataset": str, "metric": str, "margin": float, "canary_percent": int, "hold_s": float}
GATE_DEFAULTS = {"metric": "exact", "margin": 0.0, "canary_percent": 10, "hold_s": 60.0}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUFFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
MAX_EXAMPLES = 100_000


def _bad(message: str, param: str, code: str = "invalid_request") -> ControlError:
    return ControlError(400, message, code, param)


@dataclass
class JobRequest:
    model: str
    training_file: str
    validation_file: str | None
    method: str
    hyperparameters: dict[str, Any]  # resolved: no "auto" left
    suffix: str | None
    seed: int
    metadata: dict[str, str] | None
    ballast: dict[str, Any] = field(default_factory=dict)


def _number(name: str, value: Any, param: str) -> int | float:
    low, high, auto, integer = HYPER[name]
    if value == "auto" or value is None:
        return auto
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool) or not low <= value <= high:
        kind = "a whole number" if integer else "a number"
        raise _bad(f"{param} must be {kind} from {low:g} to {high:g}, or \"auto\"", param)
    return value


def _hyper(raw: Any, method: str, param: str) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _bad(f"{param} must be an object", param)
    allowed = METHOD_HYPER[method]
    if unknown := sorted(set(raw) - set(allowed)):
        raise _bad(f"{param}: unknown hyperparameter(s) {', '.join(unknown)} (allowed: {', '.join(allowed)})",
                   f"{param}.{unknown[0]}")
    return {k: _number(k, raw.get(k), f"{param}.{k}") for k in allowed}


def _method(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    m = body.get("method")
    legacy = body.get("hyperparameters")
    if m is None:
        return "supervised", _hyper(legacy, "supervised", "hyperparameters")
    if not isinstance(m, dict) or m.get("type") not in METHOD_HYPER:
        raise _bad("method.type must be `supervised` or `dpo`", "method.type")
    kind = m["type"]
    if unknown := sorted(set(m) - {"type", kind}):
        raise _bad(f"method: unknown field(s) {', '.join(unknown)}", f"method.{unknown[0]}")
    inner = m.get(kind) or {}
    if not isinstance(inner, dict) or set(inner) - {"hyperparameters"}:
        raise _bad(f"method.{kind} holds only `hyperparameters`", f"method.{kind}")
    if legacy is not None and inner.get("hyperparameters") is not None:
        raise _bad("give hyperparameters in method, or the legacy top-level field, not both", "hyperparameters")
    return kind, _hyper(inner.get("hyperparameters", legacy), kind, f"method.{kind}.hyperparameters")


def _gate(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("dataset"), str) or not raw["dataset"]:
        raise _bad("ballast.gate needs a `dataset` (the held-out split is evaluated)", "ballast.gate.dataset")
    if unknown := sorted(set(raw) - set(GATE)):
        raise _bad(f"ballast.gate: unknown field(s) {', '.join(unknown)}", f"ballast.gate.{unknown[0]}")
    out = {**GATE_DEFAULTS, **raw}
    for k, t in GATE.items():
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, int | float if t is float else t):
            raise _bad(f"ballast.gate.{k} must be a {t.__name__}", f"ballast.gate.{k}")
    if not 1 <= out["canary_percent"] <= 100 or out["hold_s"] < 0:
        raise _bad("ballast.gate: canary_percent is 1..100 and hold_s is at least 0", "ballast.gate.canary_percent")
    if not -1 <= out["margin"] <= 1:  # what the gate accepts: refused here, not after the training
        raise _bad("ballast.gate.margin is a score difference from -1 to 1", "ballast.gate.margin")
    return out


def _int(raw: dict[str, Any], k: str, low: int, high: int, default: int | None) -> int | None:
    v = raw.get(k, default)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise _bad(f"ballast.{k} must be a whole number from {low} to {high}", f"ballast.{k}")
    return v


def _ballast(raw: Any) -> dict[str, Any]:
    """The extension: {deployment, env, gate, lora: {rank, alpha, targets}, checkpoint_every, max_steps, held_out}."""
    if raw is None:
        return {}
    allowed = {"deployment", "env", "gate", "lora", "checkpoint_every", "max_steps", "held_out"}
    if not isinstance(raw, dict) or set(raw) - allowed:
        raise _bad(f"ballast: an object with {', '.join(sorted(allowed))}", "ballast")
    lora = raw.get("lora") or {}
    if not isinstance(lora, dict) or set(lora) - {"rank", "alpha", "targets"}:
        raise _bad("ballast.lora: an object with rank, alpha, targets", "ballast.lora")
    rank = _int(lora, "rank", 1, 64, 8)
    alpha = lora.get("alpha", 16.0)
    targets = lora.get("targets", ["q_proj", "k_proj", "v_proj", "o_proj"])
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha <= 1024:
        raise _bad("ballast.lora.alpha must be a number from 0 to 1024", "ballast.lora.alpha")
    if not isinstance(targets, list) or not targets or any(t not in TARGETS for t in targets):
        raise _bad(f"ballast.lora.targets: a list among {', '.join(TARGETS)}", "ballast.lora.targets")
    held = raw.get("held_out", 0.1)
    if isinstance(held, bool) or not isinstance(held, int | float) or not 0 <= held < 1:
        raise _bad("ballast.held_out is a fraction from 0 to below 1", "ballast.held_out")
    for k in ("deployment", "env"):
        if raw.get(k) is not None and not isinstance(raw[k], str):
            raise _bad(f"ballast.{k} must be a string", f"ballast.{k}")
    return {"deployment": raw.get("deployment"), "env": raw.get("env") or "production", "gate": _gate(raw.get("gate")),
            "lora": {"rank": rank, "alpha": float(alpha), "targets": targets},
            "checkpoint_every": _int(raw, "checkpoint_every", 1, 100_000, 10),
            "max_steps": _int(raw, "max_steps", 1, 1_000_000, None), "held_out": float(held)}


def parse_request(body: dict[str, Any]) -> JobRequest:
    if unknown := sorted(set(body) - FIELDS):
        raise _bad(f"unknown field(s) {', '.join(unknown)}", unknown[0])
    model, training = body.get("model"), body.get("training_file")
    if not isinstance(model, str) or not model:
        raise _bad("model is required: the name of an LLM deployment", "model")
    if not isinstance(training, str) or not training:
        raise _bad("training_file is required: a file id (purpose fine-tune) or dataset:NAME", "training_file")
    validation = body.get("validation_file")
    if validation is not None and not isinstance(validation, str):
        raise _bad("validation_file must be a file id", "validation_file")
    method, hyper = _method(body)
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not SUFFIX.match(suffix)):
        raise _bad("suffix: up to 40 letters, digits, - and _", "suffix")
    seed = body.get("seed", 0)
    if seed is None:
        seed = 0
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= 2**31 - 1:
        raise _bad("seed must be a whole number from 0 to 2147483647", "seed")
    meta = body.get("metadata")
    if meta is not None and (not isinstance(meta, dict) or len(meta) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in meta.items())):
        raise _bad("metadata: at most 16 string pairs (keys up to 64, values up to 512 characters)", "metadata")
    return JobRequest(model, training, validation, method, hyper, suffix, seed, meta, _ballast(body.get("ballast")))


def _preference(obj: Any) -> dict[str, Any]:
    """One OpenAI preference example as the worker's {prompt, chosen, rejected}, or ValueError saying why not."""
    if not isinstance(obj, dict) or not isinstance(obj.get("input"), dict):
        raise ValueError('expected {"input": {"messages": [...]}, "preferred_output": [...], '
                         '"non_preferred_output": [...]}')
    prompt = obj["input"].get("messages")
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("input.messages must be a non-empty list")
    out = {"prompt": prompt}
    for k, name in (("preferred_output", "chosen"), ("non_preferred_output", "rejected")):
        v = obj.get(k)
        if not isinstance(v, list) or len(v) != 1:
            raise ValueError(f"{k} must be a list of one assistant message")
        check_example({"messages": [*prompt, v[0]]})
        out[name] = v[0]
    return out


def training_rows(content: bytes, method: str, param: str) -> list[dict[str, Any]]:
    """Every line of a training file in the worker's form; a 400 naming the first bad line."""
    rows: list[dict[str, Any]] = []
    for n, raw in enumerate(content.decode("utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        if len(rows) >= MAX_EXAMPLES:
            raise _bad(f"more than {MAX_EXAMPLES} examples", param, "invalid_file")
        try:
            obj = json.loads(raw)
            rows.append(_preference(obj) if method == "dpo" else {"messages": check_example(obj)})
        except ValueError as e:
            raise _bad(f"{param}: line {n}: {e}", param, "invalid_file") from None
    if not rows:
        raise _bad(f"{param}: the file holds no examples", param, "invalid_file")
    return rows
