"""Chains as a unit in the store: versions (one pinned version of every step), environments, promote, rollback.

A chain version names each step's deployment and version; the entry step's package pins the versions of the
steps it calls (`ballast chains deploy` builds it that way), so a request routed to a chain version's entry
runs exactly that version's steps. Promoting a chain moves every step's environment to its version in one go
(each a normal promotion, waiting for ready replicas) and the chain's own pointer, which the gateway routes by.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ballast.control.chain_guard import missing_steps
from ballast.control.chain_keys import ChainKeys
from ballast.control.errors import ControlError, check_name
from ballast.control.events import add_event
from ballast.control.service import ControlPlane
from ballast.control.times import iso
from ballast.store import ChainEnvironment, ChainVersion, Deployment, Version, utcnow


@dataclass(frozen=True)
class ChainTarget:
    """What the gateway needs of a chain: the entry (deployment, version) per environment and per version."""

    environments: dict[str, tuple[str, int]]
    versions: dict[int, tuple[str, int]]
    steps: set[str]  # every step deployment of every version: the calls between steps go to these
    env_versions: dict[str, int] = field(default_factory=dict)  # the chain version each environment serves
    broken: dict[int, list[str]] = field(default_factory=dict)  # chain version -> its deleted steps


def _entry_version(v: ChainVersion) -> tuple[str, int]:
    return v.entry, next(int(s["version"]) for s in v.steps if s["deployment"] == v.entry)


def _version_view(v: ChainVersion) -> dict[str, Any]:
    missing = missing_steps(v.steps)
    return {"chain": v.chain, "version": v.number, "entry": v.entry, "steps": list(v.steps),
            "created_at": iso(v.created_at), "created_by": v.created_by, "broken": bool(missing),
            "missing_steps": missing}


class ChainStore:
    def __init__(self, control: ControlPlane, keys: ChainKeys | None = None) -> None:
        self.control = control
        self.sessions = control.sessions
        self.keys = keys or ChainKeys(control.sessions)

    # ---- versions --------------------------------------------------------------------------------
    def _check_steps(self, s: Session, entry: str, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not steps:
            raise ControlError(400, "a chain version needs at least one step", "invalid_chain", "steps")
        clean = []
        for st in steps:
            dep = check_name(str(st.get("deployment", "")), param="steps.deployment")
            number = int(st.get("version", 0))
            found = s.scalar(select(Version.number).join(Deployment, Deployment.id == Version.deployment_id)
                             .where(Deployment.name == dep, Version.number == number))
            if found is None:
                raise ControlError(404, f"deployment {dep!r} has no version {number}", "version_not_found", "steps")
            clean.append({"step": str(st.get("step") or dep), "deployment": dep, "version": number})
        if entry not in {c["deployment"] for c in clean}:
            raise ControlError(400, f"the entry {entry!r} is not one of the steps", "invalid_chain", "entry")
        return clean

    def record(self, chain: str, entry: str, steps: list[dict[str, Any]], actor: str = "system") -> dict[str, Any]:
        """A chain version for these step versions (the existing one when the same steps were recorded before);
        issues (or widens) the chain's internal key."""
        check_name(chain, "chain name")
        for _ in range(3):
            try:
                with self.sessions() as s, s.begin():
                    return self._record(s, chain, entry, steps, actor)
            except IntegrityError:
                continue  # recorded concurrently: read it again
        raise ControlError(409, f"could not record a version of chain {chain!r}; retry", "conflict")

    def _record(self, s: Session, chain: str, entry: str, steps: list[dict[str, Any]], actor: str
                ) -> dict[str, Any]:
        clean = self._check_steps(s, entry, steps)
        fp = hashlib.sha256(json.dumps([entry, clean], sort_keys=True).encode()).hexdigest()
        self.keys.ensure(s, chain, [c["deployment"] for c in clean])
        old = s.scalar(select(ChainVersion).where(ChainVersion.chain == chain, ChainVersion.fingerprint == fp))
        if old is not None:
            return {**_version_view(old), "reused": True}
        number = (s.scalar(select(func.max(ChainVersion.number)).where(ChainVersion.chain == chain)) or 0) + 1
        row = ChainVersion(chain=chain, number=number, fingerprint=fp, entry=entry, steps=clean,
                           created_at=utcnow(), created_by=actor)
        s.add(row)
        s.flush()
        add_event(s, entry, "chain_version", f"chain {chain} version {number} recorded", actor, chain=chain,
                  chain_version=number)
        return {**_version_view(row), "reused": False}

    def _version(self, s: Session, chain: str, number: int | None) -> ChainVersion:
        q = select(ChainVersion).where(ChainVersion.chain == chain)
        q = q.where(ChainVersion.number == number) if number is not None else q.order_by(ChainVersion.number.desc())
        row = s.scalars(q.limit(1)).first()
        if row is None:
            what = f"version {number}" if number is not None else "versions"
            raise ControlError(404, f"chain {chain!r} has no {what}", "chain_not_found", "version")
        return row

    # ---- environments ----------------------------------------------------------------------------
    def promote(self, chain: str, version: int | None, env: str = "production", actor: str = "system"
                ) -> dict[str, Any]:
        """Move `env` of every step, and of the chain, to chain version `version` (default: the newest)."""
        check_name(env, "environment name", "env")
        with self.sessions() as s, s.begin():
            target = self._version(s, chain, version)
            row = s.scalar(select(ChainEnvironment).where(ChainEnvironment.chain == chain,
                                                          ChainEnvironment.name == env))
            previous = row.version if row is not None else None
        return self._move(chain, env, target.number, previous, actor, "promoted")

    def rollback(self, chain: str, env: str = "production", actor: str = "system") -> dict[str, Any]:
        """Point `env` of the chain and of all its steps back at the chain version it served before."""
        with self.sessions() as s:
            row = s.scalar(select(ChainEnvironment).where(ChainEnvironment.chain == chain,
                                                          ChainEnvironment.name == env))
            if row is None:
                raise ControlError(404, f"chain {chain!r} has no environment {env!r}", "chain_not_found", "env")
            if row.previous_version is None:
                raise ControlError(409, f"chain {chain!r} has no previous version in {env}", "nothing_to_roll_back",
                                   "env")
            target, current = row.previous_version, row.version
        return self._move(chain, env, target, current, actor, "rolled back")

    def _move(self, chain: str, env: str, number: int, previous: int | None, actor: str, verb: str
              ) -> dict[str, Any]:
        with self.sessions() as s:
            row = self._version(s, chain, number)
            steps = list(row.steps)
            if missing := missing_steps(steps):
                raise ControlError(409, f"chain {chain!r} version {number} is broken: its step "
                                   f"{', '.join(missing)} was deleted", "chain_broken", "version")
            self._check_steps(s, row.entry, steps)  # every step version still exists: move all or none
        moved = [{**st, **self.control.promote(st["deployment"], st["version"], env, actor=actor)} for st in steps]
        with self.control.lock, self.sessions() as s, s.begin():
            row = s.scalar(select(ChainEnvironment).where(ChainEnvironment.chain == chain,
                                                          ChainEnvironment.name == env))
            if row is None:
                s.add(ChainEnvironment(chain=chain, name=env, version=number, previous_version=None,
                                       updated_at=utcnow()))
            elif row.version != number:
                row.previous_version, row.version, row.updated_at = row.version, number, utcnow()
            entry = self._version(s, chain, number).entry
            add_event(s, entry, "chain_" + verb.replace(" ", "_"), f"chain {chain}: {env} {verb} to version "
                      f"{number}", actor, chain=chain, env=env, chain_version=number, previous=previous)
        self.control.routing.changed()
        return {"chain": chain, "environment": env, "version": number, "previous_version": previous,
                "steps": moved}

    # ---- internal key ----------------------------------------------------------------------------
    def rotate_key(self, chain: str, grace_s: float = 300.0, actor: str = "system") -> dict[str, Any]:
        """Issue the chain's next internal key; the current one stays valid for `grace_s` (running step replicas
        fetch the new one meanwhile; new replicas start with it), then is revoked."""
        if not 0 <= grace_s <= 86400:
            raise ControlError(400, "grace_s must be between 0 and 86400 seconds", "invalid_request", "grace_s")
        with self.control.lock, self.sessions() as s, s.begin():
            entry = self._version(s, chain, None).entry
            out = self.keys.rotate(s, chain, grace_s)
            if not out:
                raise ControlError(404, f"chain {chain!r} has no internal key", "chain_not_found", "name")
            add_event(s, entry, "chain_key_rotated", f"chain {chain}: internal key rotated (generation "
                      f"{out['generation']}); the previous key is revoked at {iso(out['previous_revoked_at'])}",
                      actor, chain=chain, generation=out["generation"], grace_s=grace_s)
        self.control.routing.changed()
        return {"chain": chain, **out, "previous_revoked_at": iso(out["previous_revoked_at"]), "grace_s": grace_s}

    # ---- reads -----------------------------------------------------------------------------------
    def describe(self, chain: str) -> dict[str, Any]:
        with self.sessions() as s:
            versions = s.scalars(select(ChainVersion).where(ChainVersion.chain == chain)
                                 .order_by(ChainVersion.number)).all()
            if not versions:
                raise ControlError(404, f"no chain {chain!r}", "chain_not_found", "name")
            envs = s.scalars(select(ChainEnvironment).where(ChainEnvironment.chain == chain)
                             .order_by(ChainEnvironment.name)).all()
            return {"name": chain, "versions": [_version_view(v) for v in versions],
                    "environments": [{"name": e.name, "version": e.version, "previous_version": e.previous_version,
                                      "updated_at": iso(e.updated_at)} for e in envs]}

    def list(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            names = s.scalars(select(ChainVersion.chain).distinct().order_by(ChainVersion.chain)).all()
        return [self.describe(n) for n in names]

    def targets(self) -> dict[str, ChainTarget]:
        """Every chain's entry per environment and per version: what the gateway routes `/chains/...` by."""
        with self.sessions() as s:
            versions = s.scalars(select(ChainVersion)).all()
            envs = s.scalars(select(ChainEnvironment)).all()
            by_version = {(v.chain, v.number): _entry_version(v) for v in versions}
        out: dict[str, ChainTarget] = {}
        for v in versions:
            t = out.setdefault(v.chain, ChainTarget({}, {}, set()))
            t.versions[v.number] = by_version[(v.chain, v.number)]
            t.steps.update(s["deployment"] for s in v.steps if not s.get("missing"))
            if missing := missing_steps(v.steps):
                t.broken[v.number] = missing
        for e in envs:
            if (e.chain, e.version) in by_version:
                out[e.chain].environments[e.name] = by_version[(e.chain, e.version)]
                out[e.chain].env_versions[e.name] = e.version
        return out
