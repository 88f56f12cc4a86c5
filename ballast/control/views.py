"""Read views of the control plane (what `ballast deployments`, `show`, `events` and the REST API
return): plain dicts built from short read-only sessions, never a write."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ballast.control.errors import ControlError
from ballast.control.planner import env_traffic
from ballast.control.times import aware, iso
from ballast.store import Deployment, Environment, Event, Replica, Version, utcnow

Sessions = sessionmaker[Session]


def get_deployment(s: Session, name: str) -> Deployment:
    dep = s.scalar(select(Deployment).where(Deployment.name == name))
    if dep is None:
        raise ControlError(404, f"no deployment named {name!r}", "deployment_not_found", "name")
    return dep


def get_env(s: Session, dep: Deployment, env: str) -> Environment:
    row = s.scalar(select(Environment).where(Environment.deployment_id == dep.id, Environment.name == env))
    if row is None:
        raise ControlError(404, f"deployment {dep.name!r} has no environment {env!r}", "environment_not_found", "env")
    return row


def list_deployments(sessions: Sessions) -> list[dict[str, Any]]:
    with sessions() as s:
        deps = s.scalars(select(Deployment).order_by(Deployment.name)).all()
        envs = s.scalars(select(Environment)).all()
        replicas = s.scalars(select(Replica)).all()
        latest = dict(s.execute(select(Version.deployment_id, func.max(Version.number))
                                .group_by(Version.deployment_id)).all())
        counts = dict(s.execute(select(Version.deployment_id, func.count()).group_by(Version.deployment_id)).all())
    out = []
    for d in deps:
        reps = [r for r in replicas if r.deployment == d.name]
        out.append({
            "name": d.name,
            "created_at": iso(d.created_at),
            "versions": counts.get(d.id, 0),
            "latest_version": latest.get(d.id),
            "environments": {e.name: e.version for e in envs if e.deployment_id == d.id},
            "replicas": {"ready": sum(r.state == "ready" for r in reps), "total": len(reps)},
        })
    return out


def describe(sessions: Sessions, name: str) -> dict[str, Any]:
    now = utcnow()
    with sessions() as s:
        dep = get_deployment(s, name)
        versions = s.scalars(select(Version).where(Version.deployment_id == dep.id).order_by(Version.number)).all()
        envs = s.scalars(select(Environment).where(Environment.deployment_id == dep.id)
                         .order_by(Environment.name)).all()
        replicas = s.scalars(select(Replica).where(Replica.deployment == name)
                             .order_by(Replica.version, Replica.started_at)).all()
    return {
        "name": dep.name,
        "created_at": iso(dep.created_at),
        "versions": [_version_view(v, replicas) for v in versions],
        "environments": [_env_view(e) for e in envs],
        "replicas": [_replica_view(r, now) for r in replicas],
    }


def _version_view(v: Version, replicas: Any) -> dict[str, Any]:
    mine = [r for r in replicas if r.version == v.number]
    return {
        "number": v.number, "fingerprint": v.fingerprint, "created_at": iso(v.created_at),
        "created_by": v.created_by, "desired": v.desired, "min_replicas": v.min_replicas,
        "max_replicas": v.max_replicas, "retire_at": iso(v.retire_at), "dev": v.dev, "revision": v.revision,
        "package_path": v.package_path, "last_cold_start_s": v.last_cold_start_s,
        "replicas": {"ready": sum(r.state == "ready" for r in mine), "total": len(mine)},
        "pools": list(((v.config or {}).get("placement") or {}).get("pools") or []),  # pinned; empty: any
    }


def _env_view(e: Environment) -> dict[str, Any]:
    return {
        "name": e.name, "version": e.version, "previous_version": e.previous_version,
        "canary": ({"version": e.canary_version, "percent": e.canary_percent, "ramp_s": e.canary_ramp_s,
                    "started_at": iso(e.canary_started_at)} if e.canary_version is not None else None),
        "pending": ({"version": e.pending_version, "canary_percent": e.pending_canary_percent or None,
                     "ramp_s": e.pending_ramp_s} if e.pending_version is not None else None),
        "min_replicas": e.min_replicas, "max_replicas": e.max_replicas, "updated_at": iso(e.updated_at),
        "traffic": env_traffic(e),
    }


def _replica_view(r: Replica, now: datetime) -> dict[str, Any]:
    started = aware(r.started_at)
    return {
        "id": r.id, "version": r.version, "state": r.state, "pool": r.pool, "url": r.url, "port": r.port,
        "pid": r.pid, "started_at": iso(r.started_at), "ready_at": iso(r.ready_at),
        "uptime_s": round((now - started).total_seconds(), 1) if started and r.pid else None,
        "restarts": r.restarts, "failures": r.failures, "last_error": r.last_error,
        "reason": r.last_error if r.state == "pending" else None,  # why it waits (resources it needs)
        "next_start_at": iso(r.next_start_at), "revision": r.revision,
    }


def endpoints(sessions: Sessions, name: str, env: str) -> dict[str, Any]:
    """Where an environment's traffic goes now: versions with weights and their ready replica URLs."""
    with sessions() as s:
        traffic = env_traffic(get_env(s, get_deployment(s, name), env))
        replicas = s.scalars(select(Replica).where(Replica.deployment == name, Replica.state == "ready")).all()
    targets = [{"version": v, "weight": w,
                "replicas": [{"id": r.id, "url": r.url} for r in replicas if r.version == v and r.url]}
               for v, w in traffic]
    return {"deployment": name, "environment": env, "targets": targets}


def events(sessions: Sessions, name: str | None = None, limit: int = 100,
           after: int | None = None) -> list[dict[str, Any]]:
    with sessions() as s:
        q = select(Event)
        if name:
            q = q.where(Event.deployment == name)
        if after is not None:
            rows = list(s.scalars(q.where(Event.id > after).order_by(Event.id).limit(limit)).all())
        else:
            rows = list(reversed(s.scalars(q.order_by(Event.id.desc()).limit(limit)).all()))
    return [{"id": e.id, "ts": iso(e.ts), "deployment": e.deployment, "kind": e.kind, "actor": e.actor,
             "message": e.message, "data": e.data} for e in rows]
