"""Capacity pools in the store: add, list, drain, remove (the REST API and `ballast pools`), and the
failover transitions the reconciler applies (a pool goes down, its replicas are re-placed; it comes back).

Pool events are written under the deployment name `-` (they concern every deployment); each replica moved
out of a pool gets an event under its own deployment as well.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ballast.control.errors import ControlError, check_name
from ballast.control.events import add_event
from ballast.control.health import ReplicaState
from ballast.control.placement import PoolInfo
from ballast.control.times import aware, iso
from ballast.store import Pool, Replica, utcnow

POOL_EVENTS = "-"
KINDS = ("local", "ray")
RETRY_MAX_S = 60.0


def retry_after_s(failures: int) -> float:
    """A pool that went down is tried again after BALLAST_POOL_RETRY_S (5 s), doubling per failure in a row."""
    try:
        base = float(os.environ.get("BALLAST_POOL_RETRY_S") or 5.0)
    except ValueError:
        base = 5.0
    return min(RETRY_MAX_S, base * 2 ** max(failures - 1, 0))


def ensure_default(s: Session, name: str, kind: str) -> None:
    """The platform's own backend is a pool too (created on the first reconcile, never removed)."""
    if s.get(Pool, name) is None:
        s.add(Pool(name=name, kind=kind, region="", labels={"default": True}, state="active", healthy=True,
                   failures=0))


def infos(s: Session, default: str) -> list[PoolInfo]:
    return [PoolInfo(p.name, p.kind, p.state, p.healthy, p.max_replicas, p.region, dict(p.labels or {}),
                     p.name == default, p.cloud or "", p.cost_per_hour)
            for p in s.scalars(select(Pool).order_by(Pool.name)).all()]


def view(p: Pool, counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    mine = counts.get(p.name, {})
    return {"name": p.name, "kind": p.kind, "address": p.address, "region": p.region, "labels": p.labels or {},
            "cloud": p.cloud or "", "cost_per_hour": p.cost_per_hour,
            "max_replicas": p.max_replicas, "state": p.state, "healthy": p.healthy, "reason": p.reason,
            "retry_at": iso(p.retry_at), "default": bool((p.labels or {}).get("default")),
            "replicas": {"ready": mine.get(ReplicaState.READY, 0), "total": sum(mine.values())},
            "created_at": iso(p.created_at)}


class PoolStore:
    """What the REST API changes: pool rows, each change an event; the reconciler acts on the next tick."""

    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def list(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            counts: dict[str, dict[str, int]] = {}
            for pool, state, n in s.execute(select(Replica.pool, Replica.state, func.count())
                                            .group_by(Replica.pool, Replica.state)).all():
                counts.setdefault(pool, {})[state] = n
            return [view(p, counts) for p in s.scalars(select(Pool).order_by(Pool.name)).all()]

    def add(self, name: str, kind: str, address: str | None, region: str, labels: dict[str, str],
            max_replicas: int | None, actor: str = "system", cloud: str = "",
            cost_per_hour: float | None = None) -> dict[str, Any]:
        check_name(name, "pool name")
        if kind not in KINDS:
            raise ControlError(400, f"unknown pool kind {kind!r} (local or ray)", "invalid_pool_kind", "kind")
        if kind == "ray" and not address:
            raise ControlError(400, "a ray pool needs the address of its cluster", "missing_address", "address")
        if kind == "local" and address:
            raise ControlError(400, "a local pool has no address", "invalid_address", "address")
        with self.sessions() as s, s.begin():
            if s.get(Pool, name) is not None:
                raise ControlError(409, f"pool {name!r} exists already", "pool_exists", "name")
            row = Pool(name=name, kind=kind, address=address, region=region, labels=dict(labels),
                       max_replicas=max_replicas, cloud=cloud, cost_per_hour=cost_per_hour,
                       state="active", healthy=True, failures=0, created_at=utcnow())
            s.add(row)
            where = f" at {address}" if address else ""
            add_event(s, POOL_EVENTS, "pool_added", f"pool {name} added ({kind}{where})", actor, pool=name)
            return view(row, {})

    def _get(self, s: Session, name: str) -> Pool:
        row = s.get(Pool, name)
        if row is None:
            raise ControlError(404, f"no pool named {name!r}", "pool_not_found", "name")
        return row

    def drain(self, name: str, undo: bool = False, actor: str = "system") -> dict[str, Any]:
        """Draining: no new replicas; the pool's replicas move to other pools, each stopped once its
        replacement serves. `undo` makes it active again."""
        with self.sessions() as s, s.begin():
            row = self._get(s, name)
            row.state = "active" if undo else "draining"
            what = "active again: takes new replicas" if undo else "draining: its replicas move to other pools"
            add_event(s, POOL_EVENTS, "pool_active" if undo else "pool_draining", f"pool {name} {what}", actor,
                      pool=name)
            return view(row, {})

    def remove(self, name: str, actor: str = "system") -> dict[str, Any]:
        with self.sessions() as s, s.begin():
            row = self._get(s, name)
            if (row.labels or {}).get("default"):
                raise ControlError(409, f"pool {name!r} is the platform's own backend and cannot be removed",
                                   "pool_is_default", "name")
            left = s.scalar(select(func.count()).select_from(Replica).where(Replica.pool == name)) or 0
            if left:
                raise ControlError(409, f"pool {name!r} still runs {left} replica(s): `ballast pools drain {name}` "
                                   "first", "pool_not_empty", "name")
            s.delete(row)
            add_event(s, POOL_EVENTS, "pool_removed", f"pool {name} removed", actor, pool=name)
            return {"name": name, "removed": True}


def mark_down(s: Session, name: str, reason: str, now: datetime) -> list[Replica]:
    """Fail a pool over: it takes no replicas until its retry time, and every replica in it is returned to be
    stopped (the scaling pass places replacements in the other pools)."""
    row = s.get(Pool, name)
    if row is None or not row.healthy:
        return []
    row.healthy, row.reason = False, reason
    row.failures += 1
    wait = retry_after_s(row.failures)
    row.retry_at = now + timedelta(seconds=wait)
    add_event(s, POOL_EVENTS, "pool_down", f"pool {name} is down ({reason}): its replicas move to other "
              f"pools; tried again in {wait:g}s", pool=name, reason=reason, failures=row.failures)
    moved = list(s.scalars(select(Replica).where(Replica.pool == name,
                                                 Replica.state != ReplicaState.STOPPING)).all())
    for r in moved:
        r.state = ReplicaState.STOPPING
        add_event(s, r.deployment, "replica_stopping", f"replica {r.id}: pool {name} is down; replacing it in "
                  "another pool", replica=r.id, version=r.version, pool=name)
    return moved


def retry_due(s: Session, now: datetime) -> list[str]:
    """Pools that are down and due to be tried again."""
    return [p.name for p in s.scalars(select(Pool).where(Pool.healthy.is_(False))).all()
            if p.retry_at is None or aware(p.retry_at) <= now]


def mark_up(s: Session, name: str) -> None:
    """The pool answers again: it takes replicas again (`failures` stays until one of them is ready there,
    so a pool that keeps failing is tried less and less often)."""
    row = s.get(Pool, name)
    if row is None or row.healthy:
        return
    row.healthy, row.reason, row.retry_at = True, None, None
    add_event(s, POOL_EVENTS, "pool_up", f"pool {name} is back: it takes replicas again", pool=name)


def settle(s: Session, ready_pools: set[str]) -> None:
    """A pool with a ready replica has recovered for good: its failure count starts over."""
    for p in s.scalars(select(Pool).where(Pool.failures > 0, Pool.healthy.is_(True))).all():
        if p.name in ready_pools:
            p.failures = 0
