"""Evals in the store: the examples a run takes from a dataset, the platform's internal eval key, and results
kept as `eval` events.

What an eval event keeps: the targets, metrics, mean scores, the delta, counts, and per example only the dataset
record id with its scores. Never a prompt, a reference or an output: the text stays in the dataset's rows, so
deleting a dataset (or one captured request) removes every copy of it, and an audit log readable by every admin
holds no user data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ballast.control.chain_keys import ChainKeys
from ballast.control.datasets import Datasets
from ballast.control.errors import ControlError
from ballast.control.events import add_event
from ballast.control.times import iso
from ballast.store import ApiKey, Event, hash_key, utcnow

SPLITS = {"heldout": "held_out", "held_out": "held_out", "train": "train", "all": "all"}
INTERNAL_KEY_ID = "key-internal-evals"
MAX_STORED_EXAMPLES = 2000  # per-example scores kept in one event
# The split the adapter gate evaluates on: a fine-tuning job trains on `Datasets.export(name, GATE_HELD_OUT,
# GATE_SEED)["train"]`, so the gate's held-out examples were never trained on.
GATE_HELD_OUT = 0.2
GATE_SEED = 0


@dataclass(frozen=True)
class EvalExample:
    record: int  # the dataset row
    source: str  # capture, import
    messages: list[dict[str, Any]]


def examples(datasets: Datasets, dataset: str, split: str, held_out: float, seed: int,
             limit: int | None) -> list[EvalExample]:
    """The examples of one split (`heldout` by the same seeded shuffle as `datasets export`), 404/400 otherwise."""
    if split not in SPLITS:
        raise ControlError(400, f"split must be one of {', '.join(sorted(SPLITS))}", "invalid_split", "split")
    parts = datasets.split(dataset, held_out, seed)
    rows = parts["train"] + parts["held_out"] if SPLITS[split] == "all" else parts[SPLITS[split]]
    rows.sort(key=lambda r: r[0])
    if not rows:
        raise ControlError(400, f"the {split} split of `{dataset}` is empty (held_out={held_out:g})", "empty_split",
                           "split")
    return [EvalExample(rid, source, list(ex["messages"])) for rid, source, ex in rows[:limit]]


def internal_key(sessions: sessionmaker[Session]) -> str:
    """The secret of the platform's own key for evals and the gate (admin: they load adapters and read every
    deployment); derived, so every platform on one store has it, and only its hash is stored."""
    secret = ChainKeys(sessions).derived("internal:evals")
    with sessions() as s:
        row = s.get(ApiKey, INTERNAL_KEY_ID)
        if row is None:
            s.add(ApiKey(id=INTERNAL_KEY_ID, name="evals (internal)", key_hash=hash_key(secret), prefix=secret[:10],
                         scopes=["admin"], created_at=utcnow(), budget_per="month"))
        else:
            row.key_hash, row.revoked_at = hash_key(secret), None
        s.commit()
    return secret


def record_eval(sessions: sessionmaker[Session], deployment: str, message: str, actor: str,
                **data: Any) -> int:
    """Write one `eval` event; returns its id (the eval's id)."""
    with sessions() as s:
        row = add_event(s, deployment, "eval", message, actor, **data)
        s.commit()
        return int(row.id)


def _view(e: Event, full: bool) -> dict[str, Any]:
    data = dict(e.data or {})
    if not full:
        data.pop("per_example", None)
    return {"id": e.id, "ts": iso(e.ts), "deployment": e.deployment, "actor": e.actor, "message": e.message,
            **data}


def list_evals(sessions: sessionmaker[Session], limit: int = 50, deployment: str | None = None) -> list[dict[str, Any]]:
    with sessions() as s:
        q = select(Event).where(Event.kind == "eval")
        if deployment:
            q = q.where(Event.deployment == deployment)
        rows = s.scalars(q.order_by(Event.id.desc()).limit(limit)).all()
        return [_view(e, False) for e in rows]


def show_eval(sessions: sessionmaker[Session], eval_id: int) -> dict[str, Any]:
    with sessions() as s:
        e = s.get(Event, eval_id)
        if e is None or e.kind != "eval":
            raise ControlError(404, f"no eval {eval_id}", "not_found", "id")
        return _view(e, True)
