"""Fine-tuning jobs, events and checkpoints as OpenAI's API shows them (plus the `ballast` extension)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from ballast.control.times import aware
from ballast.store import FineTuneCheckpoint, FineTuneEvent, FineTuneJob


def _ts(dt: datetime | None) -> int | None:
    d = aware(dt)
    return int(d.timestamp()) if d else None


def page(rows: list[Any], limit: int, view: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    data = [view(r) for r in rows[:limit]]
    return {"object": "list", "data": data, "has_more": len(rows) > limit,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def job_view(j: FineTuneJob) -> dict[str, Any]:
    h = dict(j.hyperparameters or {})
    legacy = {k: h[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier") if k in h}
    b = dict(j.ballast or {})
    return {
        "object": "fine_tuning.job", "id": j.id, "model": j.model, "created_at": _ts(j.created_at),
        "finished_at": _ts(j.finished_at), "fine_tuned_model": j.fine_tuned_model, "organization_id": "ballast",
        "result_files": [], "status": j.status, "validation_file": j.validation_file,
        "training_file": j.training_file, "hyperparameters": legacy, "trained_tokens": j.trained_tokens,
        "error": j.error, "user_provided_suffix": j.suffix, "seed": j.seed,
        "estimated_finish": _ts(j.estimated_finish) if j.status in ("queued", "running") else None,
        "integrations": [], "metadata": j.metadata_,
        "method": {"type": j.method, j.method: {"hyperparameters": h}},
        "ballast": {**b, "base_version": j.base_version, "adapter_name": j.adapter_name, "step": j.step,
                    "total_steps": j.total_steps, "attempts": j.attempts, "pid": j.pid,
                    "started_at": _ts(j.started_at)},
    }


def event_view(e: FineTuneEvent) -> dict[str, Any]:
    return {"object": "fine_tuning.job.event", "id": f"ftevent-{e.id}", "created_at": _ts(e.created_at),
            "level": e.level, "message": e.message, "data": e.data, "type": e.type}


def checkpoint_view(c: FineTuneCheckpoint, j: FineTuneJob) -> dict[str, Any]:
    return {"object": "fine_tuning.job.checkpoint", "id": c.id, "created_at": _ts(c.created_at),
            "fine_tuned_model_checkpoint": f"{j.model}/{j.adapter_name}:step-{c.step}",
            "fine_tuning_job_id": j.id, "step_number": c.step,
            "metrics": {"step": c.step, "train_loss": c.loss}}
