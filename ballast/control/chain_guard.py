"""No chain version points at nothing: deleting a deployment a chain's step is refused, or (forced) marks the
chain versions that use it broken.

A broken chain version keeps its row (its history, its number), with the deleted step flagged `missing` in its
steps, and a new fingerprint: deploying the chain again (its step deployment made anew, whose version numbers
start over) records a new chain version instead of reviving the broken one. The gateway answers a run of a
broken chain version with a 409 naming the missing step; promoting one is refused.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ballast.control.errors import ControlError
from ballast.control.events import add_event
from ballast.store import ChainVersion


def missing_steps(steps: list[dict[str, Any]]) -> list[str]:
    """The steps (class names) of a chain version whose deployment was deleted."""
    return [str(st.get("step") or st["deployment"]) for st in steps if st.get("missing")]


def _users(s: Session, deployment: str) -> list[ChainVersion]:
    rows = s.scalars(select(ChainVersion).order_by(ChainVersion.chain, ChainVersion.number)).all()
    return [v for v in rows if any(st["deployment"] == deployment and not st.get("missing") for st in v.steps)]


def _names(rows: list[ChainVersion]) -> str:
    by_chain: dict[str, list[int]] = {}
    for v in rows:
        by_chain.setdefault(v.chain, []).append(v.number)
    return ", ".join(f"{c} (version{'s' if len(n) > 1 else ''} {', '.join(map(str, n))})" for c, n in by_chain.items())


def guard_delete(s: Session, deployment: str, force: bool, actor: str) -> list[dict[str, Any]]:
    """In the delete's transaction: refuse (409) when chain versions use `deployment`, unless `force`, which marks
    them broken. Returns the chain versions marked."""
    rows = _users(s, deployment)
    if not rows:
        return []
    if not force:
        raise ControlError(409, f"deployment {deployment!r} is a step of chain {_names(rows)}; delete with force "
                           "to mark those chain versions broken", "deployment_in_chain", "name")
    marked = []
    for v in rows:
        v.steps = [{**st, "missing": True} if st["deployment"] == deployment else st for st in v.steps]
        v.fingerprint = hashlib.sha256(f"broken:{v.fingerprint}".encode()).hexdigest()
        step = next(st["step"] for st in v.steps if st["deployment"] == deployment)
        add_event(s, v.entry, "chain_broken", f"chain {v.chain} version {v.number} is broken: its step {step} "
                  f"({deployment}) was deleted", actor, chain=v.chain, chain_version=v.number, step=step)
        marked.append({"chain": v.chain, "version": v.number, "missing": missing_steps(v.steps)})
    return marked
