"""What the platform's fine-tuning runner changes in the store: starting a job, its worker's progress (steps,
checkpoints, ETA) as events, the end (succeeded, failed) and the trained adapter's registry row."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ballast.control.finetune import _event, eta
from ballast.store import FineTuneCheckpoint, FineTuneJob, TrainedAdapter, utcnow


@dataclass(frozen=True)
class Active:
    """A job the runner supervises (status running, or cancelled with its worker still to stop)."""

    id: str
    status: str
    pid: int | None
    pid_start: str | None
    attempts: int
    offset: int
    cancel: bool
    ballast: dict[str, Any]
    model: str
    adapter_name: str


def _active(j: FineTuneJob) -> Active:
    return Active(j.id, j.status, j.pid, j.pid_start, j.attempts, j.progress_offset, j.cancel_requested,
                  dict(j.ballast or {}), j.model, j.adapter_name)


class FineTuneState:
    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def queued(self) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(FineTuneJob.id).where(FineTuneJob.status == "queued")
                                  .order_by(FineTuneJob.created_at, FineTuneJob.id)))

    def active(self) -> list[Active]:
        with self.sessions() as s:
            rows = s.scalars(select(FineTuneJob).where(
                (FineTuneJob.status == "running") | (FineTuneJob.cancel_requested.is_(True)))).all()
            return [_active(j) for j in rows]

    def started(self, job_id: str, pid: int, pid_start: str | None, resumed: bool) -> bool:
        """The worker is running (False: the job was cancelled meanwhile, and the caller stops it)."""
        with self.sessions() as s:
            j = s.get(FineTuneJob, job_id)
            if j is None or j.status not in ("queued", "running"):
                return False
            j.status, j.pid, j.pid_start = "running", pid, pid_start
            j.attempts += 1
            j.started_at = j.started_at or utcnow()
            what = "Resumed" if resumed else "Started"
            _event(s, job_id, f"{what} training (worker pid {pid}, attempt {j.attempts})")
            s.commit()
            return True

    def stopped(self, job_id: str) -> None:
        """A cancelled job's worker is gone."""
        with self.sessions() as s:
            j = s.get(FineTuneJob, job_id)
            if j is not None:
                j.pid, j.cancel_requested = None, False
                _event(s, job_id, "Worker stopped")
                s.commit()

    def progress(self, job_id: str, lines: list[dict[str, Any]], offset: int, job_dir: Path) -> None:
        """Fold the worker's new progress lines into the job (step, tokens, ETA), its events and checkpoints."""
        with self.sessions() as s:
            j = s.get(FineTuneJob, job_id)
            if j is None:
                return
            for p in lines:
                self._line(s, j, p, job_dir)
            j.progress_offset = offset
            s.commit()

    def _line(self, s: Session, j: FineTuneJob, p: dict[str, Any], job_dir: Path) -> None:
        kind = p.get("type")
        if kind == "step":
            j.step, j.total_steps = int(p["step"]), p.get("total_steps")
            j.trained_tokens, j.estimated_finish = p.get("trained_tokens"), eta(p.get("eta_s"))
            _event(s, j.id, f"Step {p['step']}/{p.get('total_steps')}: training loss={p.get('loss')}",
                   data={k: p.get(k) for k in ("step", "total_steps", "loss", "tokens_per_s", "eta_s",
                                               "trained_tokens")}, kind="metrics")
        elif kind == "checkpoint":
            s.add(FineTuneCheckpoint(id=f"ftckpt-{j.id[6:18]}-{p['step']}", job_id=j.id, step=int(p["step"]),
                                     path=str(job_dir / str(p["path"])), loss=p.get("loss")))
            _event(s, j.id, f"Checkpoint at step {p['step']}")
        elif kind == "start":
            _event(s, j.id, f"Worker {'resumed at' if p.get('resumed') else 'began at'} step {p.get('step')} of "
                            f"{p.get('total_steps')} ({p.get('examples')} examples)")
        elif kind == "validation":
            _event(s, j.id, f"Validation loss={p.get('loss')} on {p.get('examples')} examples",
                   data={"step": j.step, "valid_loss": p.get("loss")}, kind="metrics")
        elif kind == "error":
            _event(s, j.id, f"Worker error: {p.get('message')}", level="error")

    def finish(self, job_id: str, ok: bool, *, error: str | None = None, trained_tokens: int | None = None,
               adapter_dir: Path | None = None) -> bool:
        """succeeded (the adapter registered) or failed; False when the job had ended already (cancelled)."""
        with self.sessions() as s:
            j = s.get(FineTuneJob, job_id)
            if j is None or j.status != "running":
                return False
            j.pid, j.finished_at, j.estimated_finish = None, utcnow(), None
            if ok and adapter_dir is not None:
                j.status, j.fine_tuned_model = "succeeded", f"{j.model}/{j.adapter_name}"
                j.trained_tokens = trained_tokens if trained_tokens is not None else j.trained_tokens
                s.merge(TrainedAdapter(name=j.adapter_name, job_id=j.id, deployment=j.model, path=str(adapter_dir),
                                       created_at=utcnow()))
                _event(s, job_id, f"New fine-tuned model created: {j.fine_tuned_model} (adapter in "
                                  f"$BALLAST_HOME/finetune/{job_id}/adapter)")
                _event(s, job_id, "The job has successfully completed")
            else:
                j.status = "failed"
                j.error = {"code": "training_failed", "message": error or "the worker failed", "param": None}
                _event(s, job_id, f"The job failed: {j.error['message']}", level="error")
            s.commit()
            return True

    def add_event(self, job_id: str, message: str, level: str = "info") -> None:
        with self.sessions() as s:
            _event(s, job_id, message, level)
            s.commit()

    def adapters(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            return [{"name": a.name, "job_id": a.job_id, "deployment": a.deployment, "path": a.path}
                    for a in s.scalars(select(TrainedAdapter).order_by(TrainedAdapter.created_at))]


def proc_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22): a pid plus this names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(") ", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def alive(pid: int | None, start: str | None) -> bool:
    return pid is not None and start is not None and proc_start(pid) == start

