"""Deployments, versions and environments: the control plane's operations on desired state.

Every operation is a short transaction on the store plus an event (the audit log). Nothing here
starts or stops processes: the reconciler reads the desired state these operations write and drives
the backend toward it. Environment pointers move under one lock per platform process, and version
numbers come from a row lock on the deployment, so concurrent deploys get distinct numbers on
SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ballast.config import ConfigError
from ballast.control import views
from ballast.control.chain_guard import guard_delete
from ballast.control.errors import ControlError, check_name
from ballast.control.events import add_event
from ballast.control.health import ACTIVE_STATES
from ballast.control.packages import pin_pools, store_package
from ballast.control.planner import ENV_FIELDS, EnvState, canary_percent_at, env_traffic, promote_env
from ballast.control.snapshot import Routing
from ballast.control.times import aware, iso
from ballast.package import Package, PackageError, load_package
from ballast.store import Deployment, Environment, Replica, Version, utcnow

DEV_ENV = "development"
__all__ = ["ACTIVE_STATES", "ControlError", "ControlPlane", "Settings", "add_event", "aware", "canary_percent_at",
           "check_name", "env_traffic", "iso"]


def moves_traffic(op: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """After the operation committed, routing snapshots older than it are stale (see control.snapshot)."""

    @functools.wraps(op)
    def wrapper(self: ControlPlane, *args: Any, **kwargs: Any) -> dict[str, Any]:
        result = op(self, *args, **kwargs)
        self.routing.changed()
        return result

    return wrapper


@dataclass
class Settings:
    retire_grace_s: float = 300.0  # a version that leaves every environment keeps running this long
    drain_s: float = 1.0  # between taking a replica out of the routes and sending it SIGTERM
    backoff_base_s: float = 1.0  # crash-loop backoff (health.backoff_s), capped at backoff_max_s
    backoff_max_s: float = 60.0
    interval_s: float = 0.5  # reconcile period


class ControlPlane:
    """Operations on desired state. Thread-safe; the REST API calls these from its worker threads."""

    def __init__(self, sessions: sessionmaker[Session], home: Path, settings: Settings | None = None):
        self.sessions = sessions
        self.home = home
        self.packages_dir = home / "packages"
        self.logs_dir = home / "logs"
        self.settings = settings or Settings()
        self.lock = threading.RLock()  # environment pointers move under it (API and reconciler)
        self.routing = Routing(sessions)

    # ---- lookups -------------------------------------------------------------------------------
    def _deployment(self, s: Session, name: str) -> Deployment:
        return views.get_deployment(s, name)

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
               actor: str = "system", source: str | None = None, pools: list[str] | None = None) -> dict[str, Any]:
        """Validate the package, store a content-addressed copy, create (or reuse) a numbered version; `pools`
        pin its placement (over `placement.pools` of its ballast.yaml)."""
        package = self.load(path)
        name = check_name(name or package.name)
        if env is not None:
            check_name(env, "environment name", "env")
        for pool in pools or ():
            check_name(pool, "pool name", "pools")
        stored = store_package(package, self.packages_dir)
        dep_id = self._get_or_create_deployment(name)
        config, fingerprint = pin_pools(package.config.model_dump(mode="json"), package.fingerprint, pools)
        auto = package.config.autoscaling
        with self.sessions() as s:
            try:
                with s.begin():
                    # Row lock on the deployment (a write on SQLite, which serialises writers): the next
                    # number and the fingerprint check below are consistent across concurrent deploys.
                    s.execute(update(Deployment).where(Deployment.id == dep_id)
                              .values(next_version=Deployment.next_version))
                    existing = s.scalar(select(Version).where(Version.deployment_id == dep_id,
                                                              Version.fingerprint == fingerprint))
                    if existing is not None:
                        number, reused = existing.number, True
                        add_event(s, name, "deploy", f"package {package.fingerprint[:12]} is already version "
                                  f"{number}; reusing it", actor, version=number, reused=True)
                    else:
                        number = s.scalars(select(Deployment.next_version).where(Deployment.id == dep_id)).one()
                        s.execute(update(Deployment).where(Deployment.id == dep_id).values(next_version=number + 1))
                        s.add(Version(deployment_id=dep_id, number=number, fingerprint=fingerprint,
                                      package_path=str(stored), config=config, created_by=actor,
                                      created_at=utcnow(), min_replicas=auto.min_replicas,
                                      max_replicas=auto.max_replicas, desired=0))
                        reused = False
                        pinned = f" (pinned to pools {', '.join(pools)})" if pools else ""
                        add_event(s, name, "deploy", f"version {number} created from {source or package.path}{pinned}",
                                  actor, version=number, fingerprint=package.fingerprint, pools=list(pools or ()))
                    has_env = s.scalar(select(func.count()).select_from(Environment)
                                       .where(Environment.deployment_id == dep_id)) or 0
            except IntegrityError:
                # The same package deployed concurrently: the other transaction created the version.
                with self.sessions() as s2:
                    existing = s2.scalar(select(Version).where(Version.deployment_id == dep_id,
                                                               Version.fingerprint == fingerprint))
                    if existing is None:
                        raise ControlError(409, "concurrent deploy conflict; retry", "conflict") from None
                    number, reused, has_env = existing.number, True, 1
        result: dict[str, Any] = {"deployment": name, "version": number, "reused": reused,
                                  "fingerprint": package.fingerprint, "package_path": str(stored),
                                  "pools": config.get("placement", {}).get("pools", [])}
        target_env = env or (None if has_env else "production")  # the first deploy serves production
        if target_env:
            result["promotion"] = self.promote(name, number, target_env, actor=actor)
        return result

    # ---- environments --------------------------------------------------------------------------
    def _env(self, s: Session, dep: Deployment, env: str, create: bool = False) -> Environment:
        row = s.scalar(select(Environment).where(Environment.deployment_id == dep.id, Environment.name == env))
        if row is None:
            if not create:
                return views.get_env(s, dep, env)  # raises the 404
            row = Environment(deployment_id=dep.id, name=env, version=None, canary_percent=0, canary_step_percent=0,
                              canary_ramp_s=0.0, pending_canary_percent=0, pending_ramp_s=0.0, pending_actor="",
                              updated_at=utcnow())
            s.add(row)
            s.flush()
        return row

    def apply_promotion(self, s: Session, dep: Deployment, row: Environment, number: int, canary: int,
                        ramp_s: float, actor: str, kind: str = "promoted") -> str:
        """Move the pointer (the target has ready replicas). Returns the new state of the environment."""
        st = EnvState(**{f: getattr(row, f) for f in ENV_FIELDS})
        state, ev = promote_env(st, dep.name, number, canary, ramp_s, actor, utcnow(), kind)
        for f in ENV_FIELDS:
            if getattr(row, f) != getattr(st, f):
                setattr(row, f, getattr(st, f))
        add_event(s, ev.deployment, ev.kind, ev.message, ev.actor, **ev.data)
        return state

    @moves_traffic
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

    @moves_traffic
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

    @moves_traffic
    def delete(self, name: str, *, force: bool = False, actor: str = "system") -> dict[str, Any]:
        """Remove the deployment; the reconciler drains and stops its replicas (they belong to nothing now). A step
        of a chain version is kept (409) unless `force`, which marks those chain versions broken."""
        with self.lock, self.sessions() as s, s.begin():
            dep = self._deployment(s, name)
            broken = guard_delete(s, name, force, actor)
            s.execute(delete(Environment).where(Environment.deployment_id == dep.id))
            s.execute(delete(Version).where(Version.deployment_id == dep.id))
            s.execute(delete(Deployment).where(Deployment.id == dep.id))
            add_event(s, name, "delete", f"deployment {name} deleted", actor)
        return {"deployment": name, "deleted": True, **({"broken_chain_versions": broken} if broken else {})}

    # ---- dev -----------------------------------------------------------------------------------
    @moves_traffic
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

    @moves_traffic
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
            s.flush()
            left = s.scalar(select(func.count()).select_from(Version).where(Version.deployment_id == dep.id))
            if not left:  # it only ever ran `ballast dev`: nothing is left to list
                s.execute(delete(Environment).where(Environment.deployment_id == dep.id))
                s.execute(delete(Deployment).where(Deployment.id == dep.id))
                add_event(s, name, "delete", f"deployment {name} had only its development version; removed", actor)
        return {"deployment": name, "stopped": sorted(numbers), "deleted": not left}

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

    # ---- views (read-only; ballast.control.views) -------------------------------------------------
    def list_deployments(self) -> list[dict[str, Any]]:
        return views.list_deployments(self.sessions)

    def describe(self, name: str) -> dict[str, Any]:
        return views.describe(self.sessions, name)

    def endpoints(self, name: str, env: str) -> dict[str, Any]:
        return views.endpoints(self.sessions, name, env)

    def routing_table(self) -> dict[str, dict[str, Any]]:
        """Every deployment's environments (version weights) and ready replicas: the gateway's routes."""
        return self.routing.read().table()

    def events(self, name: str | None = None, limit: int = 100, after: int | None = None) -> list[dict[str, Any]]:
        return views.events(self.sessions, name, limit, after)
