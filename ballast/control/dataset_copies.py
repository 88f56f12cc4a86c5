"""The copies of a dataset's examples outside its table: a fine-tuning job on `dataset:NAME` copied its train
split into `$BALLAST_HOME/finetune/<job>/train.jsonl` (and `validation.jsonl`) so its worker never reads the store.

Deleting data must delete those copies too: a whole dataset removes the job files (and cancels a job still
training on it: its resume would need them); one record, or records past their retention, are cut out of the
files line by line (a job copy line is exactly the JSON the job wrote for that record). The trained adapter stays:
weights, not examples.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from ballast.store import DatasetRecord, FineTuneEvent, FineTuneJob, utcnow

COPIES = ("train.jsonl", "validation.jsonl")
TERMINAL = ("succeeded", "failed", "cancelled")


def copy_lines(records: Iterable[DatasetRecord]) -> set[str]:
    """The lines a job may have written for these records (supervised and DPO shapes)."""
    out: set[str] = set()
    for r in records:
        answer = r.correction or r.completion
        if answer:
            out.add(json.dumps({"messages": [*r.messages, answer]}))
        if r.correction and r.completion:
            out.add(json.dumps({"prompt": r.messages, "chosen": r.correction, "rejected": r.completion}))
    return out


def _jobs(s: Session, dataset: str) -> list[FineTuneJob]:
    ref = f"dataset:{dataset}"
    return list(s.scalars(select(FineTuneJob).where(or_(FineTuneJob.training_file == ref,
                                                        FineTuneJob.validation_file == ref))))


def _rewrite(path: Path, drop: set[str]) -> int:
    """Remove the lines in `drop` from a 0600 JSONL file (atomically); returns how many went."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    kept = [x for x in lines if x not in drop]
    if len(kept) == len(lines):
        return 0
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(x + "\n" for x in kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


def _event(s: Session, job_id: str, message: str) -> None:
    s.add(FineTuneEvent(job_id=job_id, message=message, level="info", type="message", created_at=utcnow()))


def purge_dataset(s: Session, home: Path, dataset: str) -> int:
    """A whole dataset was deleted: remove its jobs' copies (cancelling a job not yet done). Returns the jobs."""
    jobs = _jobs(s, dataset)
    for job in jobs:
        if job.status not in TERMINAL:
            job.cancel_requested = job.pid is not None
            job.status, job.finished_at = "cancelled", utcnow()
            _event(s, job.id, f"Job cancelled: its dataset {dataset} was deleted")
        for name in COPIES:
            (home / "finetune" / job.id / name).unlink(missing_ok=True)
        _event(s, job.id, f"Training data deleted with dataset {dataset}")
    return len(jobs)


def purge_records(s: Session, home: Path, by_dataset: dict[str, list[DatasetRecord]]) -> int:
    """Some records were deleted (by request id, or by retention): cut their lines out of job copies."""
    n = 0
    for dataset, records in by_dataset.items():
        drop = copy_lines(records)
        for job in _jobs(s, dataset) if drop else []:
            cut = sum(_rewrite(home / "finetune" / job.id / name, drop) for name in COPIES)
            if cut:
                _event(s, job.id, f"{cut} deleted example(s) of dataset {dataset} removed from the job's data")
            n += cut
    return n


def group(records: Iterable[DatasetRecord]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for r in records:
        out.setdefault(r.dataset, []).append(r)
    return out
