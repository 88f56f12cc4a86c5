"""The reconciler's transactions: copy state out of the store for the pure planner and the health
state machine, and write their decisions back (rows, events). No backend call happens here."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, select
from sqlalchemy.orm import Session

from ballast.control.actuator import Launched, ReplicaRow
from ballast.control.configs import CONFIGS
from ballast.control.events import add_event, record
from ballast.control.health import ACTIVE_STATES, SCALE_DOWN_ORDER, ReplicaState, Verdict, backoff_s, crashlooping
from ballast.control.packages import source_signature
from ballast.control.placement import Placement
from ballast.control.planner import (
    ENV_FIELDS,
    ClusterState,
    EnvState,
    Key,
    PlanResult,
    Scaler,
    VersionPlan,
    VersionState,
    plan,
)
from ballast.control.times import aware
from ballast.package import IGNORED_NAMES
from ballast.store import Deployment, Environment, Replica, Version, utcnow

if TYPE_CHECKING:
    from ballast.control.service import ControlPlane, Settings

Stop = tuple[ReplicaRow, bool, bool, float]  # (replica, drain first, remove the row after, grace seconds)


class DevWatcher:
    """`ballast dev`: reload a dev version when its source changes (checked about once a second). A new
    dev version's first signature is taken at once, before its replica starts, so no edit slips by."""

    def __init__(self) -> None:
        self._signatures: dict[Key, Any] = {}
        self._last_check = 0.0

    def check(self, s: Session, control: ControlPlane, versions: list[Version], deps: dict[int, str],
              result: PlanResult) -> None:
        due = time.monotonic() - self._last_check >= 1.0
        if due:
            self._last_check = time.monotonic()
        for v in versions:
            name = deps.get(v.deployment_id)
            key = (name or "", v.number)
            if not v.dev or name is None or (not due and key in self._signatures):
                continue
            try:
                sig = source_signature(Path(v.package_path), IGNORED_NAMES)
            except OSError:
                continue
            old, self._signatures[key] = self._signatures.get(key), sig
            if old is not None and old != sig:
                control.reload_dev(s, v, name)
                result.versions[key].revision = v.revision
                result.versions[key].config = CONFIGS.get(v)


def plan_in_store(s: Session, control: ControlPlane, scaler: Scaler, dev: DevWatcher) -> PlanResult:
    """Run the planner on the store's state and write back what it changed (caller holds the transaction)."""
    now = utcnow()
    deps = {d.id: d.name for d in s.scalars(select(Deployment)).all()}
    versions = [v for v in s.scalars(select(Version)).all() if v.deployment_id in deps]
    envs = s.scalars(select(Environment)).all()
    ready: dict[Key, int] = {}
    present: dict[Key, int] = {}
    for dep, number, state in s.execute(select(Replica.deployment, Replica.version, Replica.state)).all():
        present[(dep, number)] = present.get((dep, number), 0) + 1
        if state == ReplicaState.READY:
            ready[(dep, number)] = ready.get((dep, number), 0) + 1
    vstates = [VersionState(v.id, v.deployment_id, deps[v.deployment_id], v.number,
                            CONFIGS.get(v), v.desired, v.min_replicas, v.max_replicas,
                            v.retire_at, v.revision, v.package_path, v.dev) for v in versions]
    estates = [EnvState(**{f: getattr(e, f) for f in ENV_FIELDS}) for e in envs]
    result = plan(ClusterState(deps, vstates, estates, ready, present), scaler, now, control.settings.retire_grace_s)
    for row, st in zip(envs, estates, strict=True):
        for f in ENV_FIELDS:
            if getattr(row, f) != getattr(st, f):
                setattr(row, f, getattr(st, f))
    for v, vs in zip(versions, vstates, strict=True):
        if v.desired != vs.desired:
            v.desired = vs.desired
        if v.retire_at != vs.retire_at:
            v.retire_at = vs.retire_at
    record(s, result.events)
    dev.check(s, control, versions, deps, result)
    return result


def _mark_stopping(s: Session, row: Replica, why: str) -> bool:
    """Returns whether the replica was serving (its leaving moves traffic)."""
    was_ready = row.state == ReplicaState.READY
    row.state = ReplicaState.STOPPING
    add_event(s, row.deployment, "replica_stopping", f"replica {row.id}: {why}; draining", replica=row.id,
              version=row.version)
    return was_ready


def apply_verdicts(s: Session, rows: dict[str, Replica], versions: dict[Key, VersionPlan],
                   verdicts: dict[str, Verdict], tails: dict[str, list[str]], now: datetime, settings: Settings,
                   stopping: Collection[str], on_ready: Callable[[Replica, float | None], None]
                   ) -> tuple[list[Stop], bool]:
    """Health transitions, and replicas of versions that no longer exist. Returns (stops, traffic moved)."""
    to_stop: list[Stop] = []
    routed = False
    for row in list(rows.values()):
        if row.id in stopping:
            continue
        vp = versions.get((row.deployment, row.version))
        if row.state == ReplicaState.STOPPING or vp is None:
            if vp is None and row.state != ReplicaState.STOPPING:
                routed |= _mark_stopping(s, row, "belongs to no version")
            to_stop.append((ReplicaRow.of(row), True, True, vp.grace_s if vp else 30.0))
            continue
        verdict = verdicts.get(row.id)
        if verdict is None:
            continue
        routed |= row.state == ReplicaState.READY or verdict.kind in ("ready", "ready_again")
        if verdict.kind == "fail":
            _fail(s, row, vp, verdict, tails.get(row.id, []), now, settings, to_stop)
        elif verdict.kind == "ready":
            started = aware(row.started_at)
            cold = (now - started).total_seconds() if started else None
            row.state, row.ready_at, row.failures, row.next_start_at = ReplicaState.READY, now, 0, None
            s.execute(cast(Table, Version.__table__).update()  # declared as FromClause; it is the Table
                      .where(Version.number == row.version, Version.deployment_id == select(Deployment.id)
                             .where(Deployment.name == row.deployment).scalar_subquery())
                      .values(last_cold_start_s=cold))
            on_ready(row, cold)
            after = f" after {cold:.1f}s" if cold is not None else ""
            add_event(s, row.deployment, "replica_ready", f"replica {row.id} ready ({row.url}){after}",
                      replica=row.id, version=row.version)
        elif verdict.kind == "ready_again":
            row.state = ReplicaState.READY
            add_event(s, row.deployment, "replica_ready", f"replica {row.id} is ready again", replica=row.id,
                      version=row.version)
        elif verdict.kind == "unready":
            row.state = ReplicaState.UNREADY
            add_event(s, row.deployment, "replica_unready", f"replica {row.id} is not ready: {verdict.reason}",
                      replica=row.id, version=row.version)
    return to_stop, routed


def _fail(s: Session, row: Replica, vp: VersionPlan, verdict: Verdict, tail: list[str], now: datetime,
          settings: Settings, to_stop: list[Stop]) -> None:
    """Replace a replica that died, failed its probes or never became ready; back off when it repeats."""
    if verdict.kill:
        to_stop.append((ReplicaRow.of(row), False, False, min(vp.grace_s, 5.0)))
    row.last_error = verdict.reason + ("\nlast log lines:\n" + "\n".join(tail) if tail else "")
    row.restarts += 1
    row.failures += 1
    row.pid, row.url, row.port = None, None, None
    _after_failure(s, row, verdict.reason, now, settings, "replacing it")


def _after_failure(s: Session, row: Replica, reason: str, now: datetime, settings: Settings, retry: str) -> None:
    if crashlooping(row.failures):
        delay = backoff_s(row.failures, settings.backoff_base_s, settings.backoff_max_s)
        row.state = ReplicaState.CRASHLOOP
        row.next_start_at = now + timedelta(seconds=delay)
        add_event(s, row.deployment, "replica_crashloop", f"replica {row.id} failed {row.failures} times in a row "
                  f"({reason}); next start in {delay:g}s", replica=row.id, version=row.version, error=reason,
                  failures=row.failures)
    else:
        row.state = ReplicaState.STARTING  # started again this tick
        add_event(s, row.deployment, "replica_failed", f"replica {row.id}: {reason}; {retry}", replica=row.id,
                  version=row.version, error=reason)


def _place(s: Session, row: Replica, vp: VersionPlan, placement: Placement) -> str:
    """Choose a pool for a new replica, or again for one that has no process and whose pool cannot take it."""
    pool = placement.choose(vp.deployment, vp.number, vp.config) or ""
    if pool != row.pool:
        row.pool = pool
    if not pool:
        why = placement.why_none(vp.config)
        if row.state != ReplicaState.PENDING or row.last_error != why:
            row.state, row.last_error = ReplicaState.PENDING, why
            add_event(s, row.deployment, "replica_pending", f"replica {row.id} pending: {why}", replica=row.id,
                      version=row.version, reason=why)
    return pool


def _new_row(s: Session, vp: VersionPlan, now: datetime, new_id: Callable[[], str], placement: Placement) -> Replica:
    row = Replica(id=new_id(), deployment=vp.deployment, version=vp.number, pool="", state=ReplicaState.STARTING,
                  started_at=now, restarts=0, failures=0, revision=vp.revision, data={})
    s.add(row)
    _place(s, row, vp, placement)
    return row


MOVING = "moving_to"  # in a replica's data: it is being replaced in that pool (rebalance), then stopped


def _settle_pools(s: Session, mine: list[Replica], vp: VersionPlan, placement: Placement, usable: set[str]) -> None:
    """Replicas with no process whose pool cannot take them are placed again; a move to a pool that cannot take
    replicas any more (down again) is called off."""
    for r in mine:
        if r.pid is None and r.pool not in usable:
            _place(s, r, vp, placement)
        if (r.data or {}).get(MOVING) not in (None, *usable):
            r.data = {k: v for k, v in r.data.items() if k != MOVING}
            add_event(s, vp.deployment, "replica_move_cancelled", f"replica {r.id} stays in pool {r.pool}: the "
                      "pool it was moving to cannot take replicas", replica=r.id, version=vp.number)


def _rebalance(s: Session, vp: VersionPlan, current: list[Replica], placement: Placement) -> list[Replica]:
    """When every replica of a version serves and placement would put one elsewhere (a pool is back), mark one to
    move: a replacement is placed now, and the replica stops once it serves (make-before-break, one at a time)."""
    if len(current) != vp.desired or any(r.state != ReplicaState.READY for r in current):
        return []  # a move, a start or a scale is under way: one thing at a time
    move = placement.rebalance(vp.config, [r.pool for r in current])
    if move is None:
        return []
    frm, to = move
    victim = max((r for r in current if r.pool == frm), key=lambda r: aware(r.started_at).timestamp())
    victim.data = {**(victim.data or {}), MOVING: to}
    add_event(s, vp.deployment, "replica_moving", f"replica {victim.id} moves from pool {frm} to pool {to} "
              "(rebalance); it stops once its replacement serves", replica=victim.id, version=vp.number,
              **{"from": frm, "to": to})
    current.remove(victim)
    return [victim]


def scale(s: Session, rows: dict[str, Replica], versions: dict[Key, VersionPlan], stopping: Collection[str],
          now: datetime, new_id: Callable[[], str], placement: Placement, to_stop: list[Stop]) -> bool:
    """Move each version toward its desired count, each new replica placed in a pool; replicas of an older
    revision, or in a pool that is draining, are replaced once the replacements serve. Returns whether traffic
    moved."""
    routed = False
    usable = placement.usable()
    for key, vp in versions.items():
        mine = [r for r in rows.values() if (r.deployment, r.version) == key and r.state in ACTIVE_STATES
                and r.id not in stopping]
        _settle_pools(s, mine, vp, placement, usable)
        current = [r for r in mine if r.revision >= vp.revision and (r.pool in usable or r.pid is None)
                   and not (r.data or {}).get(MOVING)]
        stale = [r for r in mine if r not in current]
        if not stale:
            stale = _rebalance(s, vp, current, placement)
        for _ in range(vp.desired - len(current)):
            row = _new_row(s, vp, now, new_id, placement)
            rows[row.id] = row
            current.append(row)
        excess = len(current) - vp.desired
        if excess > 0:
            victims = sorted(current, key=lambda r: (SCALE_DOWN_ORDER.get(r.state, 0),
                                                     -aware(r.started_at).timestamp()))
            for r in victims[:excess]:
                routed |= _mark_stopping(s, r, "scaled down")
                to_stop.append((ReplicaRow.of(r), True, True, vp.grace_s))
        ready_current = sum(r.state == ReplicaState.READY for r in current)
        if stale and (ready_current >= max(vp.desired, 1) or vp.desired == 0):
            for r in stale:
                why = ("replaced by a newer revision" if r.revision < vp.revision else f"pool {r.pool} is draining"
                       if r.pool not in usable else f"moved to pool {r.data[MOVING]} (rebalanced)")
                routed |= _mark_stopping(s, r, why)
                to_stop.append((ReplicaRow.of(r), True, True, vp.grace_s))
    return routed


def record_launches(s: Session, results: list[Launched], versions: dict[Key, VersionPlan], now: datetime,
                    settings: Settings) -> list[ReplicaRow]:
    """Write what the actuator did; returns processes started for rows that went away (to stop)."""
    leftovers = []
    for res in results:
        row = s.get(Replica, res.replica_id)
        h = res.handle
        if row is None or row.state == ReplicaState.STOPPING or row.pid is not None:
            if h is not None:
                leftovers.append(ReplicaRow(h.replica_id, "-", 0, "stopping", h.pid, h.url, h.port, h.log_path,
                                            h.pool, None, 0, dict(h.data)))
            continue
        if res.pending is not None:
            if row.state != ReplicaState.PENDING or row.last_error != res.pending:
                row.state, row.last_error = ReplicaState.PENDING, res.pending
                add_event(s, row.deployment, "replica_pending", f"replica {row.id} pending: {res.pending}",
                          replica=row.id, version=row.version, reason=res.pending)
            continue
        if h is None:
            row.failures += 1
            row.last_error = res.error
            _after_failure(s, row, res.error or "could not start", now, settings, "retrying")
            continue
        vp = versions.get((row.deployment, row.version))
        row.state, row.started_at, row.ready_at, row.next_start_at = ReplicaState.STARTING, now, None, None
        row.pid, row.url, row.port, row.log_path, row.pool = h.pid, h.url, h.port, h.log_path, h.pool
        row.data = dict(h.data)
        if vp is not None:
            row.revision = vp.revision
        add_event(s, row.deployment, "replica_started", f"replica {row.id} starting on {h.pool} at {h.url} "
                  f"(pid {h.pid})", replica=row.id, version=row.version, pid=h.pid)
    return leftovers
