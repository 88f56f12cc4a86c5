"""Datasets in the store: captured pairs and their feedback, imports and exports in OpenAI's chat fine-tuning
JSONL format (`{"messages": [...]}` per line), deletion and the retention sweep.

Every write here receives data that is already redacted (the gateway's capture redacts before calling in).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ballast.control.dataset_copies import group, purge_dataset, purge_records
from ballast.control.errors import ControlError
from ballast.store import DatasetRecord, utcnow

ROLES = {"system", "user", "assistant", "tool", "developer"}
MAX_IMPORT_LINES = 100_000


def check_example(obj: Any) -> list[dict[str, Any]]:
    """The messages of one fine-tuning example, or ValueError saying what is wrong with it."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise ValueError('expected an object with a non-empty "messages" list')
    for i, m in enumerate(obj["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] needs a role among {', '.join(sorted(ROLES))}")
        if not isinstance(m.get("content"), str | list) and not m.get("tool_calls"):
            raise ValueError(f"messages[{i}] needs a content string")
    if obj["messages"][-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's (the completion to learn)")
    return list(obj["messages"])


def parse_jsonl(text: str) -> list[list[dict[str, Any]]]:
    """Every example of a JSONL file, or ControlError(400) naming the first bad line (nothing is half-imported)."""
    examples: list[list[dict[str, Any]]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(examples) >= MAX_IMPORT_LINES:
            raise ControlError(400, f"more than {MAX_IMPORT_LINES} examples", "invalid_file", "file")
        try:
            examples.append(check_example(json.loads(line)))
        except ValueError as e:
            raise ControlError(400, f"line {n}: {e}", "invalid_file", "file") from None
    if not examples:
        raise ControlError(400, "the file holds no examples", "invalid_file", "file")
    return examples


def _example(r: DatasetRecord) -> dict[str, Any]:
    """One row as a fine-tuning example: the correction, when there is one, is the completion."""
    answer = r.correction or r.completion
    return {"messages": list(r.messages) + ([answer] if answer else [])}


class Datasets:
    def __init__(self, sessions: sessionmaker[Session], home: Path | None = None):
        """`home`: where fine-tuning jobs keep their copies of a dataset, which deletion removes too."""
        self.sessions = sessions
        self.home = home

    def capture(self, dataset: str, request_id: str, key_id: str, deployment: str, messages: list[Any],
                completion: dict[str, Any] | None, retention_days: float) -> None:
        """Write one captured (already redacted) pair; a request id is captured once."""
        row = DatasetRecord(dataset=dataset, request_id=request_id, key_id=key_id, deployment=deployment,
                            source="capture", messages=messages, completion=completion,
                            expires_at=utcnow() + timedelta(days=retention_days))
        with self.sessions() as s:
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                s.rollback()

    def feedback(self, request_id: str, key_id: str, admin: bool, rating: Any, correction: dict[str, Any] | None,
                 scrub_for: Callable[[str | None], Callable[[Any], Any]]) -> dict[str, Any]:
        """Record a verdict or an edited answer against a captured request of this key (any, for an admin); the
        correction is redacted with the patterns of the request's deployment."""
        with self.sessions() as s:
            row = s.scalar(select(DatasetRecord).where(DatasetRecord.request_id == request_id))
            if row is None or (row.key_id != key_id and not admin):
                raise ControlError(404, f"no captured request `{request_id}`", "not_found", "request_id")
            if rating is not None:
                row.rating = rating
            if correction is not None:
                row.correction = scrub_for(row.deployment)(correction)
            s.commit()
            return {"request_id": request_id, "dataset": row.dataset, "rating": row.rating,
                    "correction": row.correction}

    def summary(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            rows = s.execute(select(DatasetRecord.dataset, func.count(), func.count(DatasetRecord.correction),
                                    func.max(DatasetRecord.created_at))
                             .group_by(DatasetRecord.dataset).order_by(DatasetRecord.dataset)).all()
        return [{"name": d, "examples": n, "corrected": c, "updated_at": _iso(t)} for d, n, c, t in rows]

    def show(self, dataset: str, limit: int = 20) -> dict[str, Any]:
        with self.sessions() as s:
            total = s.scalar(select(func.count()).where(DatasetRecord.dataset == dataset)) or 0
            if not total:
                raise ControlError(404, f"no dataset `{dataset}`", "not_found", "name")
            rows = s.scalars(select(DatasetRecord).where(DatasetRecord.dataset == dataset)
                             .order_by(DatasetRecord.id).limit(limit)).all()
            return {"name": dataset, "examples": total,
                    "data": [{"request_id": r.request_id, "source": r.source, "deployment": r.deployment,
                              "rating": r.rating, "corrected": r.correction is not None,
                              "created_at": _iso(r.created_at), **_example(r)} for r in rows]}

    def export(self, dataset: str, held_out: float = 0.0, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
        """The dataset as fine-tuning examples, split into train and held-out by a seeded shuffle."""
        split = self.split(dataset, held_out, seed)
        return {part: [e for _, _, e in rows] for part, rows in split.items()}

    def split(self, dataset: str, held_out: float = 0.0,
              seed: int = 0) -> dict[str, list[tuple[int, str, dict[str, Any]]]]:
        """(record id, source, example) of each part: the one split `export` and the evals share."""
        with self.sessions() as s:
            rows = s.scalars(select(DatasetRecord).where(DatasetRecord.dataset == dataset)
                             .order_by(DatasetRecord.id)).all()
            examples = [(r.id, r.source, _example(r)) for r in rows if r.correction or r.completion]
        if not rows:
            raise ControlError(404, f"no dataset `{dataset}`", "not_found", "name")
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        cut = round(len(examples) * held_out)
        held = set(order[:cut])
        return {"train": [e for i, e in enumerate(examples) if i not in held],
                "held_out": [e for i, e in enumerate(examples) if i in held]}

    def import_jsonl(self, dataset: str, text: str) -> dict[str, Any]:
        examples = parse_jsonl(text)
        with self.sessions() as s:
            s.add_all([DatasetRecord(dataset=dataset, source="import", messages=m[:-1], completion=m[-1])
                       for m in examples])
            s.commit()
        return {"name": dataset, "imported": len(examples)}

    def delete(self, dataset: str, request_id: str | None = None) -> dict[str, Any]:
        """Delete a whole dataset, or one captured request of it, and the fine-tuning jobs' copies of them."""
        where = [DatasetRecord.dataset == dataset]
        if request_id is not None:
            where.append(DatasetRecord.request_id == request_id)
        with self.sessions() as s:
            gone = list(s.scalars(select(DatasetRecord).where(*where)))
            if not gone:
                raise ControlError(404, f"nothing to delete in `{dataset}`", "not_found", "name")
            s.execute(delete(DatasetRecord).where(DatasetRecord.id.in_([r.id for r in gone])))
            if self.home is not None:
                if request_id is None:
                    purge_dataset(s, self.home, dataset)
                else:
                    purge_records(s, self.home, group(gone))
            s.commit()
        return {"name": dataset, "deleted": len(gone)}

    def sweep(self, now: datetime | None = None) -> int:
        """Delete the captured pairs past their retention (and their lines in job copies); returns how many."""
        with self.sessions() as s:
            gone = list(s.scalars(select(DatasetRecord).where(DatasetRecord.expires_at < (now or utcnow()))))
            if gone:
                s.execute(delete(DatasetRecord).where(DatasetRecord.id.in_([r.id for r in gone])))
                if self.home is not None:
                    purge_records(s, self.home, group(gone))
                s.commit()
        return len(gone)


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None
