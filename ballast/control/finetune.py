"""Fine-tuning jobs in the store: create (validate the request and the data, prepare the job directory), list,
retrieve, cancel, events and checkpoints, and the state changes the platform's runner makes.

validating_files -> queued -> running -> succeeded | failed ; cancelled from any state before the end. The
training data is copied into `$BALLAST_HOME/finetune/<job>/` (0700) when the job is created, so the worker
never reads the store and a later file deletion does not change a queued job.
"""

from __future__ import annotations

import json
import os
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ballast.control.batches import BatchStore
from ballast.control.datasets import Datasets
from ballast.control.errors import ControlError
from ballast.control.eval_store import GATE_HELD_OUT, GATE_SEED
from ballast.control.finetune_spec import JobRequest, training_rows
from ballast.control.finetune_views import checkpoint_view, event_view, job_view, page
from ballast.store import (
    DatasetRecord,
    Deployment,
    Environment,
    FineTuneCheckpoint,
    FineTuneEvent,
    FineTuneJob,
    Version,
    utcnow,
)

TERMINAL = ("succeeded", "failed", "cancelled")
LEARNING_RATE = 2e-4  # what `learning_rate_multiplier` multiplies (ballast.train.spec.BASE_LEARNING_RATE)


def job_dir(home: Path, job_id: str) -> Path:
    return home / "finetune" / job_id


def _not_found(job_id: str) -> ControlError:
    return ControlError(404, f"no fine-tuning job {job_id}", "not_found", "fine_tuning_job_id")


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class FineTunes:
    def __init__(self, sessions: sessionmaker[Session], home: Path):
        self.sessions = sessions
        self.home = home
        self.files = BatchStore(sessions)

    # ---- create ---------------------------------------------------------------------------
    def _base(self, s: Session, model: str) -> tuple[int, str, str]:
        """(production version, checkpoint as named, package directory) of an LLM deployment."""
        dep = s.scalar(select(Deployment).where(Deployment.name == model)) if "/" not in model else None
        env = s.scalar(select(Environment).where(Environment.deployment_id == dep.id,
                                                 Environment.name == "production")) if dep else None
        number = env and (env.version or env.pending_version)  # a first version still starting counts
        version = s.scalar(select(Version).where(Version.deployment_id == env.deployment_id,
                                                 Version.number == number)) if env and number else None
        if version is None:
            raise ControlError(400, f"model `{model}` is not a deployment with a production version (name an LLM "
                                    "deployment; checkpoint paths are not accepted)", "model_not_found", "model")
        ckpt = (version.config.get("engine") or {}).get("checkpoint")
        if not isinstance(ckpt, str):
            raise ControlError(400, f"deployment `{model}` does not serve an LLM checkpoint of its own",
                               "model_not_supported", "model")
        return version.number, ckpt, version.package_path

    def _dataset_rows(self, s: Session, name: str, req: JobRequest) -> list[dict[str, Any]]:
        """A Ballast dataset's train split (the held-out part, by the same seeded shuffle, stays out)."""
        recs = s.scalars(select(DatasetRecord).where(DatasetRecord.dataset == name).order_by(DatasetRecord.id)).all()
        gate_held = self._gate_held_out(name, req)
        recs = [r for r in recs if r.id not in gate_held]
        if req.method == "dpo":  # preference pairs: the feedback correction is chosen, the captured answer rejected
            rows = [{"prompt": r.messages, "chosen": r.correction, "rejected": r.completion}
                    for r in recs if r.correction and r.completion]
        else:
            rows = [{"messages": [*r.messages, r.correction or r.completion]} for r in recs
                    if r.correction or r.completion]
        order = list(range(len(rows)))
        random.Random(req.seed).shuffle(order)
        held = set(order[:round(len(rows) * req.ballast.get("held_out", 0.1))])
        train = [r for i, r in enumerate(rows) if i not in held]
        if not train:
            what = "preference pairs" if req.method == "dpo" else "examples"
            raise ControlError(400, f"dataset `{name}` has no {what} to train on", "invalid_file", "training_file")
        return train

    def _gate_held_out(self, name: str, req: JobRequest) -> set[int]:
        """Record ids the job's gate evaluates on (when it gates on this dataset): never trained on."""
        gate = req.ballast.get("gate")
        if not gate or gate.get("dataset") != name:
            return set()
        split = Datasets(self.sessions).split(name, GATE_HELD_OUT, GATE_SEED)
        return {rid for rid, _, _ in split["held_out"]}

    def _rows(self, s: Session, ref: str, req: JobRequest, key_id: str, admin: bool, param: str
              ) -> list[dict[str, Any]]:
        if ref.startswith("dataset:"):
            return self._dataset_rows(s, ref.removeprefix("dataset:"), req)
        f = self.files._file(s, ref, key_id, admin)
        if f.purpose != "fine-tune":
            raise ControlError(400, f"file {ref} has purpose `{f.purpose}`, not `fine-tune`", "invalid_file", param)
        return training_rows(bytes(f.content), req.method, param)

    def create(self, key_id: str, admin: bool, req: JobRequest) -> dict[str, Any]:
        job_id = "ftjob-" + os.urandom(12).hex()
        with self.sessions() as s:
            version, ckpt, package = self._base(s, req.model)
            train = self._rows(s, req.training_file, req, key_id, admin, "training_file")
            valid = self._rows(s, req.validation_file, req, key_id, admin, "validation_file") \
                if req.validation_file else None
            adapter = f"{req.suffix or 'ft'}-{job_id[6:14]}"
            row = FineTuneJob(id=job_id, key_id=key_id, model=req.model, base_version=version, method=req.method,
                              hyperparameters=req.hyperparameters, training_file=req.training_file,
                              validation_file=req.validation_file, suffix=req.suffix, seed=req.seed,
                              metadata_=req.metadata, ballast=req.ballast or None, status="validating_files",
                              adapter_name=adapter, step=0, attempts=0, progress_offset=0, cancel_requested=False)
            self._prepare(job_dir(self.home, job_id), req, ckpt, package, train, valid)
            row.status = "queued"
            s.add(row)
            _event(s, job_id, f"Validated {len(train)} training examples; base {req.model} v{version}")
            _event(s, job_id, "Job queued")
            s.commit()
            return job_view(row)

    def _prepare(self, d: Path, req: JobRequest, ckpt: str, package: str, train: list[Any],
                 valid: list[Any] | None) -> None:
        d.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        d.mkdir(mode=0o700)
        h, b = req.hyperparameters, req.ballast
        lora = b.get("lora") or {}
        config = {"job_id": d.name, "method": req.method, "checkpoint": ckpt, "base_dir": package,
                  "n_epochs": h["n_epochs"], "batch_size": h["batch_size"],
                  "learning_rate": LEARNING_RATE * h["learning_rate_multiplier"], "beta": h.get("beta", 0.1),
                  "lora_rank": lora.get("rank", 8), "lora_alpha": lora.get("alpha", 16.0),
                  "lora_targets": lora.get("targets", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                  "checkpoint_every": b.get("checkpoint_every", 10), "max_steps": b.get("max_steps"),
                  "seed": req.seed}
        _write(d / "train.jsonl", "".join(json.dumps(r) + "\n" for r in train))
        if valid is not None:
            _write(d / "validation.jsonl", "".join(json.dumps(r) + "\n" for r in valid))
        _write(d / "config.json", json.dumps(config))

    # ---- read -----------------------------------------------------------------------------
    def _job(self, s: Session, job_id: str, key_id: str | None, admin: bool) -> FineTuneJob:
        row = s.get(FineTuneJob, job_id)
        if row is None or (not admin and row.key_id != key_id):
            raise _not_found(job_id)
        return row

    def get(self, job_id: str, key_id: str | None = None, admin: bool = True) -> dict[str, Any]:
        with self.sessions() as s:
            return job_view(self._job(s, job_id, key_id, admin))

    def list(self, key_id: str, admin: bool, limit: int, after: str | None) -> dict[str, Any]:
        with self.sessions() as s:
            q = select(FineTuneJob).order_by(FineTuneJob.created_at.desc(), FineTuneJob.id.desc())
            if not admin:
                q = q.where(FineTuneJob.key_id == key_id)
            if after:
                a = self._job(s, after, key_id, admin)
                q = q.where((FineTuneJob.created_at < a.created_at)
                            | ((FineTuneJob.created_at == a.created_at) & (FineTuneJob.id < a.id)))
            return page(list(s.scalars(q.limit(limit + 1))), limit, job_view)

    def events(self, job_id: str, key_id: str, admin: bool, limit: int, after: str | None) -> dict[str, Any]:
        with self.sessions() as s:
            self._job(s, job_id, key_id, admin)
            q = select(FineTuneEvent).where(FineTuneEvent.job_id == job_id).order_by(FineTuneEvent.id.desc())
            if after and after.removeprefix("ftevent-").isdigit():
                q = q.where(FineTuneEvent.id < int(after.removeprefix("ftevent-")))
            return page(list(s.scalars(q.limit(limit + 1))), limit, event_view)

    def checkpoints(self, job_id: str, key_id: str, admin: bool, limit: int, after: str | None) -> dict[str, Any]:
        with self.sessions() as s:
            job = self._job(s, job_id, key_id, admin)
            q = select(FineTuneCheckpoint).where(FineTuneCheckpoint.job_id == job_id)
            rows = [c for c in s.scalars(q.order_by(FineTuneCheckpoint.step.desc())) if not after or c.id < after]
            return page(rows[:limit + 1], limit, lambda c: checkpoint_view(c, job))

    # ---- changes --------------------------------------------------------------------------
    def cancel(self, job_id: str, key_id: str, admin: bool) -> dict[str, Any]:
        """Queued: cancelled at once. Running: cancelled, and the runner stops the worker (SIGTERM, SIGKILL)."""
        with self.sessions() as s:
            row = self._job(s, job_id, key_id, admin)
            if row.status in TERMINAL:
                raise ControlError(400, f"job {job_id} is {row.status} already", "invalid_state", "fine_tuning_job_id")
            row.cancel_requested = row.pid is not None
            row.status, row.finished_at = "cancelled", utcnow()
            _event(s, job_id, "Job cancelled")
            s.commit()
            return job_view(row)

    def add_event(self, job_id: str, message: str, level: str = "info", data: dict[str, Any] | None = None,
                  kind: str = "message") -> None:
        with self.sessions() as s:
            _event(s, job_id, message, level, data, kind)
            s.commit()


def _event(s: Session, job_id: str, message: str, level: str = "info", data: dict[str, Any] | None = None,
           kind: str = "message") -> None:
    s.add(FineTuneEvent(job_id=job_id, message=message, level=level, data=data, type=kind, created_at=utcnow()))


def eta(seconds: float | None) -> Any:
    return utcnow() + timedelta(seconds=seconds) if seconds is not None else None

