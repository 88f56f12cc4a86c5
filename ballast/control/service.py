"""Deployments, versions and environments: the control plane's operations on desired state.

Every operation is a short transaction on the store plus an event (the audit log). Nothing here
starts or stops processes: the reconciler reads the desired state these operations write and drives
the backend toward it. Environment pointers move under one lock per platform process, and version
numbers come from a row lock on the deployment, so concurrent deploys get distinct numbers on
SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ballast.config import ConfigError
from ballast.control.packages import store_package
from ballast.package import Package, PackageError, load_package
from ballast.store import Deployment, Environment, Event, Replica, Version, utcnow

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
ACTIVE_STATES = ("starting", "ready", "unready", "crashloop")
DEV_ENV = "development"


class ControlError(Exception):
    """An operation that cannot be done; `status` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


@dataclass
class Settings:
    retire_grace_s: float = 300.0  # a version that leaves every environment keeps running this long
    drain_s: float = 1.0  # between taking a replica out of the routes and sending it SIGTERM
    backoff_base_s: float = 1.0  # crash-loop backoff: base * 2^(failures-2), capped
    backoff_max_s: float = 60.0
    interval_s: float = 0.5  # reconcile period


def aware(dt: datetime | None) -> datetime | None:
    """SQLite gives naive datetimes back; everything stored is UTC."""
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt


def iso(dt: datetime | None) -> str | None:
    dt = aware(dt)
    return dt.isoformat().replace("+00:00", "Z") if dt else None


def check_name(name: str, what: str = "deployment name", param: str = "name") -> str:
    if not NAME_RE.match(name or ""):
        raise ControlError(400, f"invalid {what} {name!r}: use lowercase letters, digits and dashes (max 63)",
                           "invalid_name", param)
    return name


def add_event(s: Session, deployment: str, kind: str, message: str, actor: str = "system", **data: Any) -> None:
    s.add(Event(deployment=deployment, kind=kind, message=message, actor=actor or "system", data=data,
                ts=utcnow()))


def canary_percent_at(step: int, ramp_s: float, elapsed_s: float) -> int:
    """Stepwise ramp: start at `step` percent and add `step` at even intervals until 100 at `ramp_s`."""
    if ramp_s <= 0:
        return step
    if elapsed_s >= ramp_s:
        return 100
    steps = max(1, math.ceil((100 - step) / max(step, 1)))
    k = int(elapsed_s / (ramp_s / steps))
    return min(100, step + k * step) if k < steps else 100


class ControlPlane:
    """Operations on desired state. Thread-safe; the REST API calls these from its worker threads."""

    def __init__(self, sessions: sessionmaker[Session], home: Path, settings: Settings | None = None):
        self.sessions = sessions
        self.home = home
        self.packages_dir = home / "packages"
        self.logs_dir = home / "logs"
        self.settings = settings or Settings()
        self.lock = threading.RLock()  # environment pointers move under it (API and reconciler)

    # ---- lookups -------------------------------------------------------------------------------
    def _deployment(self, s: Session, name: str) -> Deployment:
        dep = s.scalar(select(Deployment).where(Deployment.name == name))
        if dep is None:
            raise ControlError(404, f"no deployment named {name!r}", "deployment_not_found", "name")
        return dep

    def _version(self, s: Session, dep: Deployment, number: int) -> Version:
        v = s.scalar(select(Version).where(Version.deployment_id == dep.id, Version.number == number))
        if v is None:
            raise ControlError(404, f"deployment {dep.name!r} has no version {number}", "version_not_found",
                               "version")
        return v

    def _ready_count(self, s: Session, deployment: str, number: int) -> int:
        return s.scalar(select(func.count()).select_from(Replica).where(
            Replica.deployment == deployment, Replica.version == number, Replica.state == "ready")) or 0

    def _get_or_create_deployment(self, name: str) -> int:
        for _ in range(5):
            with self.sessions() as s:
                dep_id = s.scalar(select(Deployment.id).where(Deployment.name == name))
                if dep_id is not None:
                    return dep_id
                try:
                    dep = Deployment(name=name, next_version=1, created_at=utcnow())
                    s.add(dep)
                    s.commit()
                    return dep.id
                except IntegrityError:
                    s.rollback()
                    continue  # created concurrently: read it
        raise ControlError(409, f"could not create deployment {name!r}; retry", "conflict")

    # ---- deploy --------------------------------------------------------------------------------
    def load(self, path: str | Path) -> Package:
        try:
            return load_package(path)
        except (ConfigError, PackageError) as e:
            raise ControlError(400, str(e), "invalid_package", "path") from None

    def deploy(self, path: str | Path, name: str | None = None, *, env: str | None = None,
               actor: str = "system") -> dict[str, Any]:
        """Validate the package, store a content-addressed copy, create (or reuse) a numbered version."""
        package = self.load(path)
        name = check_name(name or package.name)
        if env is not None:
            check_name(env, "environment name", "env")
        stored = store_package(package, self.packages_dir)
        dep_id = self._get_or_create_deployment(name)
        config = package.config.model_dump(mode="json")
        auto = package.config.autoscaling
        with self.sessions() as s:
            try:
                with s.begin():
                    # Row lock on the deployment (a write on SQLite, which serialises writers): the next
                    # number and the fingerprint check below are consistent across concurrent deploys.
                    s.execute(update(Deployment).where(Deployment.id == dep_id)
                              .values(next_version=Deployment.next_version))
                    existing = s.scalar(select(Version).where(Version.deployment_id == dep_id,
                                                              Version.fingerprint == package.fingerprint))
                    if existing is not None:
                        number, reused = existing.number, True
                        add_event(s, name, "deploy", f"package {package.fingerprint[:12]} is already version "
                                  f"{number}; reusing it", actor, version=number, reused=True)
                    else:
                        number = s.scalar(select(Deployment.next_version).where(Deployment.id == dep_id))
                        s.execute(update(Deployment).where(Deployment.id == dep_id).values(next_version=number + 1))
                        s.add(Version(deployment_id=dep_id, number=number, fingerprint=package.fingerprint,
                                      package_path=str(stored), config=config, created_by=actor,
                                      created_at=utcnow(), min_replicas=auto.min_replicas,
                                      max_replicas=auto.max_replicas, desired=0))
                        reused = False
                        add_event(s, name, "deploy", f"version {number} created from {package.path}", actor,
                                  version=number, fingerprint=package.fingerprint)
                    has_env = s.scalar(select(func.count()).select_from(Environment)
                                       .where(Environment.deployment_id == dep_id)) or 0
            except IntegrityError:
                # The same package deployed concurrently: the other transaction created the version.
                with self.sessions() as s2:
                    existing = s2.scalar(select(Version).where(Version.deployment_id == dep_id,
                                                               Version.fingerprint == package.fingerprint))
                    if existing is None:
                        raise ControlError(409, "concurrent deploy conflict; retry", "conflict") from None
                    number, reused, has_env = existing.number, True, 1
        result: dict[str, Any] = {"deployment": name, "version": number, "reused": reused,
                                  "fingerprint": package.fingerprint, "package_path": str(stored)}
        target_env = env or (None if has_env else "production")  # the first deploy serves production
        if target_env:
            result["promotion"] = self.promote(name, number, target_env, actor=actor)
        return result

    # ---- environments --------------------------------------------------------------------------
    def _env(self, s: Session, dep: Deployment, env: str, create: bool = False) -> Environment:
        row = s.scalar(select(Environment).where(Environment.deployment_id == dep.id, Environment.name == env))
        if row is None:
            if not create:
                raise ControlError(404, f"deployment {dep.name!r} has no environment {env!r}",
                                   "environment_not_found", "env")
            row = Environment(deployment_id=dep.id, name=env, version=None, canary_percent=0, canary_step_percent=0,
                              canary_ramp_s=0.0, pending_canary_percent=0, pending_ramp_s=0.0, pending_actor="",
                              updated_at=utcnow())
            s.add(row)
            s.flush()
        return row

    def apply_promotion(self, s: Session, dep: Deployment, row: Environment, number: int, canary: int,
                        ramp_s: float, actor: str, kind: str = "promoted") -> str:
        """Move the pointer (the target has ready replicas). Returns the new state of the environment."""
        now = utcnow()
        row.pending_version = None
        row.pending_canary_percent = 0
        row.pending_ramp_s = 0.0
        row.updated_at = now
        if canary and 0 < canary < 100 and row.version is not None and row.version != number:
            row.canary_version = number
            row.canary_percent = canary
            row.canary_step_percent = canary
            row.canary_ramp_s = ramp_s
            row.canary_started_at = now
            ramp = f", ramping to 100% over {ramp_s:g}s" if ramp_s > 0 else ""
            add_event(s, dep.name, "canary", f"{row.name}: version {number} gets {canary}% of traffic "
                      f"(version {row.version} the rest){ramp}", actor, env=row.name, version=number,
                      percent=canary, ramp_s=ramp_s)
            return "canary"
        old = row.version
        if old is not None and old != number:
            row.previous_version = old
        row.version = number
        row.canary_version = None
        row.canary_percent = 0
        row.canary_started_at = None
        row.canary_ramp_s = 0.0
        what = f"from version {old} " if old is not None and old != number else ""
        add_event(s, dep.name, kind, f"{row.name}: {what}to version {number}", actor, env=row.name,
                  version=number, previous=old)
        return "promoted"

    def promote(self, name: str, version: int, env: str, *, canary: int | None = None, ramp_s: float = 0.0,
                actor: str = "system") -> dict[str, Any]:
        """Point `env` at `version` once it has ready replicas (now, if it has; else the reconciler does)."""
        check_name(env, "environment name", "env")
        if canary is not None and not 0 < canary < 100:
            raise ControlError(400, "canary percent must be between 1 and 99", "invalid_canary", "canary")
        if ramp_s < 0:
            raise ControlError(400, "ramp_s must be >= 0", "invalid_ramp", "ramp_s")
        with self.lock, self.sessions() as s, s.begin():
            dep = self._deployment(s, name)
            self._version(s, dep, version)
            row = self._env(s, dep, env, create=True)
            if row.version == version and not row.canary_version and not row.pending_version:
                return {"environment": env, "state": "unchanged", "version": version}
            if row.canary_version == version and canary is None:
                # Finish a canary now.
                state = self.apply_promotion(s, dep, row, version, 0, 0.0, actor)
                return {"environment": env, "state": state, "version": version}
            if self._ready_count(s, name, version) > 0:
                state = self.apply_promotion(s, dep, row, version, canary or 0, ramp_s, actor)
                return {"environment": env, "state": state, "version": version}
            row.pending_version = version
            row.pending_canary_percent = canary or 0
            row.pending_ramp_s = ramp_s
            row.pending_actor = actor
            row.updated_at = utcnow()
            add_event(s, name, "promote_requested", f"{env}: version {version} requested; the pointer moves "
                      "when it has ready replicas", actor, env=env, version=version, canary=canary, ramp_s=ramp_s)
            return {"environment": env, "state": "pending", "version": version}

    def rollback(self, name: str, env: str, *, version: int | None = None, actor: str = "system") -> dict[str, Any]:
        """Cancel a pending promotion or a canary, or point `env` back at its previous version."""
        with self.lock, self.sessions() as s, s.begin():
            dep = self._deployment(s, name)
            row = self._env(s, dep, env)
            if version is None and row.pending_version is not None:
                pending, row.pending_version = row.pending_version, None
                add_event(s, name, "rollback", f"{env}: pending promotion to version {pending} cancelled", actor,
                          env=env, cancelled=pending)
                return {"environment": env, "state": "cancelled", "version": row.version}
            if version is None and row.canary_version is not None:
                cancelled = row.canary_version
                row.canary_version, row.canary_percent, row.canary_started_at = None, 0, None
                row.updated_at = utcnow()
                add_event(s, name, "rollback", f"{env}: canary of version {cancelled} cancelled; all traffic to "
                          f"version {row.version}", actor, env=env, cancelled=cancelled)
                return {"environment": env, "state": "promoted", "version": row.version}
            target = version if version is not None else row.previous_version
            if target is None:
                raise ControlError(409, f"{env} has no previous version to roll back to", "nothing_to_roll_back",
                                   "env")
            self._version(s, dep, target)
            if target == row.version and not row.canary_version:
                raise ControlError(409, f"{env} already points at version {target}", "already_current", "version")
            row.pending_version = None
            if self._ready_count(s, name, target) > 0:
                state = self.apply_promotion(s, dep, row, target, 0, 0.0, actor, kind="rollback")
                return {"environment": env, "state": state, "version": target}
            row.pending_version = target
            row.pending_canary_percent = 0
            row.pending_ramp_s = 0.0
            row.pending_actor = actor
            add_event(s, name, "rollback", f"{env}: rolling back to version {target} (starting its replicas; "
                      "the pointer moves when they are ready)", actor, env=env, version=target)
            return {"environment": env, "state": "pending", "version": target}

    def scale(self, name: str, env: str, *, min_replicas: int | None, max_replicas: int | None,
              actor: str = "system") -> dict[str, Any]:
        if min_replicas is not None and min_replicas < 0:
            raise ControlError(400, "min must be >= 0", "invalid_scale", "min")
        if max_replicas is not None and max_replicas < 1:
            raise ControlError(400, "max must be >= 1", "invalid_scale", "max")
        if min_replicas is not None and max_replicas is not None and min_replicas > max_replicas:
            raise ControlError(400, "min must be <= max", "invalid_scale", "min")
        with self.lock, self.sessions() as s, s.begin():
            dep = self._deployment(s, name)
            row = self._env(s, dep, env)
            if min_replicas is not None:
                row.min_replicas = min_replicas
            if max_replicas is not None:
                row.max_replicas = max_replicas
            if row.min_replicas is not None and row.max_replicas is not None and row.min_replicas > row.max_replicas:
                raise ControlError(400, f"min {row.min_replicas} > max {row.max_replicas}", "invalid_scale", "min")
            row.updated_at = utcnow()
            add_event(s, name, "scale", f"{env}: replicas min={row.min_replicas} max={row.max_replicas}", actor,
                      env=env, min=row.min_replicas, max=row.max_replicas)
            return {"environment": env, "min_replicas": row.min_replicas, "max_replicas": row.max_replicas}

    def delete(self, name: str, *, actor: str = "system") -> dict[str, Any]:
        """Remove the deployment; the reconciler drains and stops its replicas (they belong to nothing now)."""
        with self.lock, self.sessions() as s, s.begin():
            dep = self._deployment(s, name)
            s.execute(delete(Environment).where(Environment.deployment_id == dep.id))
            s.execute(delete(Version).where(Version.deployment_id == dep.id))
            s.execute(delete(Deployment).where(Deployment.id == dep.id))
            add_event(s, name, "delete", f"deployment {name} deleted", actor)
        return {"deployment": name, "deleted": True}

    # ---- dev -----------------------------------------------------------------------------------
    def dev(self, path: str | Path, name: str | None = None, *, actor: str = "system") -> dict[str, Any]:
        """A development version that runs from the source directory and reloads when its files change."""
        package = self.load(path)
        name = check_name(name or package.name)
        dep_id = self._get_or_create_deployment(name)
        fingerprint = "dev-" + hashlib.sha256(str(package.path).encode()).hexdigest()[:60]
        auto = package.config.autoscaling
        with self.lock, self.sessions() as s, s.begin():
            s.execute(update(Deployment).where(Deployment.id == dep_id).values(next_version=Deployment.next_version))
            dep = s.get(Deployment, dep_id)
            assert dep is not None
            v = s.scalar(select(Version).where(Version.deployment_id == dep_id, Version.fingerprint == fingerprint))
            if v is None:
                number = dep.next_version
                dep.next_version = number + 1
                v = Version(deployment_id=dep_id, number=number, fingerprint=fingerprint,
                            package_path=str(package.path), config=package.config.model_dump(mode="json"),
                            created_by=actor, created_at=utcnow(), min_replicas=auto.min_replicas,
                            max_replicas=auto.max_replicas, desired=1, dev=True, revision=0)
                s.add(v)
                s.flush()
            else:
                v.revision += 1
                v.config = package.config.model_dump(mode="json")
            row = self._env(s, dep, DEV_ENV, create=True)
            if row.version != v.number:
                self.apply_promotion(s, dep, row, v.number, 0, 0.0, actor, kind="dev")
            add_event(s, name, "dev", f"development replica of {package.path} (version {v.number})", actor,
                      version=v.number, path=str(package.path))
            return {"deployment": name, "version": v.number, "environment": DEV_ENV, "path": str(package.path)}

    def dev_stop(self, name: str, *, actor: str = "system") -> dict[str, Any]:
        with self.lock, self.sessions() as s, s.begin():
            dep = self._deployment(s, name)
            versions = s.scalars(select(Version).where(Version.deployment_id == dep.id, Version.dev.is_(True))).all()
            numbers = {v.number for v in versions}
            for row in s.scalars(select(Environment).where(Environment.deployment_id == dep.id)).all():
                if row.version in numbers:
                    if row.previous_version is not None and row.previous_version not in numbers:
                        row.version, row.previous_version = row.previous_version, None
                    else:
                        s.delete(row)
                elif row.pending_version in numbers or row.canary_version in numbers:
                    row.pending_version = None if row.pending_version in numbers else row.pending_version
                    row.canary_version = None if row.canary_version in numbers else row.canary_version
            for v in versions:
                s.delete(v)
            add_event(s, name, "dev", "development replica stopped", actor, versions=sorted(numbers))
        return {"deployment": name, "stopped": sorted(numbers)}

    def reload_dev(self, s: Session, v: Version, dep_name: str) -> None:
        """The source of a dev version changed: validate it and bump the revision (replicas are replaced)."""
        try:
            package = load_package(v.package_path)
        except (ConfigError, PackageError) as e:
            add_event(s, dep_name, "dev_reload_failed", f"not reloaded: {e}", version=v.number)
            return
        v.revision += 1
        v.config = package.config.model_dump(mode="json")
        add_event(s, dep_name, "dev_reload", f"files changed; reloading version {v.number} (revision {v.revision})",
                  version=v.number, revision=v.revision)

    # ---- views ---------------------------------------------------------------------------------
    def list_deployments(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            deps = s.scalars(select(Deployment).order_by(Deployment.name)).all()
            envs = s.scalars(select(Environment)).all()
            replicas = s.scalars(select(Replica)).all()
            latest = dict(s.execute(select(Version.deployment_id, func.max(Version.number))
                                    .group_by(Version.deployment_id)).all())
            counts = dict(s.execute(select(Version.deployment_id, func.count())
                                    .group_by(Version.deployment_id)).all())
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

    def describe(self, name: str) -> dict[str, Any]:
        now = utcnow()
        with self.sessions() as s:
            dep = self._deployment(s, name)
            versions = s.scalars(select(Version).where(Version.deployment_id == dep.id).order_by(Version.number)).all()
            envs = s.scalars(select(Environment).where(Environment.deployment_id == dep.id)
                             .order_by(Environment.name)).all()
            replicas = s.scalars(select(Replica).where(Replica.deployment == name)
                                 .order_by(Replica.version, Replica.started_at)).all()
        return {
            "name": dep.name,
            "created_at": iso(dep.created_at),
            "versions": [self._version_view(v, replicas) for v in versions],
            "environments": [self._env_view(e) for e in envs],
            "replicas": [self._replica_view(r, now) for r in replicas],
        }

    @staticmethod
    def _version_view(v: Version, replicas: Any) -> dict[str, Any]:
        mine = [r for r in replicas if r.version == v.number]
        return {
            "number": v.number, "fingerprint": v.fingerprint, "created_at": iso(v.created_at),
            "created_by": v.created_by, "desired": v.desired, "min_replicas": v.min_replicas,
            "max_replicas": v.max_replicas, "retire_at": iso(v.retire_at), "dev": v.dev, "revision": v.revision,
            "package_path": v.package_path, "last_cold_start_s": v.last_cold_start_s,
            "replicas": {"ready": sum(r.state == "ready" for r in mine), "total": len(mine)},
        }

    @staticmethod
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

    @staticmethod
    def _replica_view(r: Replica, now: datetime) -> dict[str, Any]:
        started = aware(r.started_at)
        return {
            "id": r.id, "version": r.version, "state": r.state, "pool": r.pool, "url": r.url, "port": r.port,
            "pid": r.pid, "started_at": iso(r.started_at), "ready_at": iso(r.ready_at),
            "uptime_s": round((now - started).total_seconds(), 1) if started and r.pid else None,
            "restarts": r.restarts, "failures": r.failures, "last_error": r.last_error,
            "next_start_at": iso(r.next_start_at), "revision": r.revision,
        }

    def endpoints(self, name: str, env: str) -> dict[str, Any]:
        """Where an environment's traffic goes now: versions with weights and their ready replica URLs."""
        with self.sessions() as s:
            dep = self._deployment(s, name)
            row = self._env(s, dep, env)
            traffic = env_traffic(row)
            replicas = s.scalars(select(Replica).where(Replica.deployment == name, Replica.state == "ready")).all()
        targets = [{"version": v, "weight": w,
                    "replicas": [{"id": r.id, "url": r.url} for r in replicas if r.version == v and r.url]}
                   for v, w in traffic]
        return {"deployment": name, "environment": env, "targets": targets}

    def routing_table(self) -> dict[str, dict[str, Any]]:
        """Every deployment's environments (version weights) and ready replicas: the gateway's routes."""
        with self.sessions() as s:
            deps = {d.id: d.name for d in s.scalars(select(Deployment)).all()}
            envs = s.scalars(select(Environment)).all()
            replicas = s.scalars(select(Replica).where(Replica.state == "ready")).all()
        out: dict[str, dict[str, Any]] = {n: {"environments": {}, "versions": {}} for n in deps.values()}
        for e in envs:
            if e.deployment_id in deps:
                out[deps[e.deployment_id]]["environments"][e.name] = env_traffic(e)
        for r in replicas:
            if r.deployment in out and r.url:
                out[r.deployment]["versions"].setdefault(r.version, []).append(r.url)
        return out

    def events(self, name: str | None = None, limit: int = 100, after: int | None = None) -> list[dict[str, Any]]:
        with self.sessions() as s:
            q = select(Event)
            if name:
                q = q.where(Event.deployment == name)
            if after is not None:
                q = q.where(Event.id > after).order_by(Event.id).limit(limit)
                rows = list(s.scalars(q).all())
            else:
                rows = list(reversed(s.scalars(q.order_by(Event.id.desc()).limit(limit)).all()))
        return [{"id": e.id, "ts": iso(e.ts), "deployment": e.deployment, "kind": e.kind, "actor": e.actor,
                 "message": e.message, "data": e.data} for e in rows]

    def retire_deadline(self) -> datetime:
        return utcnow() + timedelta(seconds=self.settings.retire_grace_s)


def env_traffic(e: Environment) -> list[tuple[int, int]]:
    """[(version, percent)] of an environment now (empty before its first promotion lands)."""
    if e.version is None:
        return []
    if e.canary_version is not None and e.canary_percent > 0:
        return [(e.version, 100 - e.canary_percent), (e.canary_version, e.canary_percent)]
    return [(e.version, 100)]
