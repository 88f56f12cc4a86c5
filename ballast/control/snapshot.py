"""The routing snapshot: the one place that reads routes out of the store.

Environments with their version weights, and each version's ready replicas and typed config, read in
one short session. The gateway routes from it (through platform/source.py) and `GET /api/v1/routes`
shows it. `generation` goes up after every committed change that moves traffic (promote, rollback,
canary step, delete, a replica becoming ready or leaving): a consumer holding an older generation
re-reads before routing, so a change is in effect as soon as the call that made it returns.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ballast.config import BallastConfig
from ballast.control.configs import CONFIGS
from ballast.control.planner import env_traffic
from ballast.store import Deployment, Environment, Pool, Replica, Version


@dataclass(frozen=True)
class VersionTarget:
    number: int
    config: BallastConfig
    replicas: list[tuple[str, str]] = field(default_factory=list)  # ready (replica id, url)
    remote: set[str] = field(default_factory=set)  # ready replicas outside the platform's own (default) pool


@dataclass(frozen=True)
class DeploymentTargets:
    name: str
    environments: dict[str, list[tuple[int, int]]]  # env -> [(version, percent)] now
    pending: dict[str, int]  # env -> version a promotion waits for
    versions: dict[int, VersionTarget]


@dataclass(frozen=True)
class RoutingSnapshot:
    generation: int
    deployments: dict[str, DeploymentTargets]

    def table(self) -> dict[str, dict[str, Any]]:
        """The REST view: environments' weights and ready replica URLs per version."""
        return {name: {"environments": dict(d.environments),
                       "versions": {n: [url for _, url in t.replicas] for n, t in d.versions.items() if t.replicas}}
                for name, d in self.deployments.items()}


class Routing:
    """Owns the generation counter and reads snapshots; thread-safe."""

    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions
        self._generation = 0
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        return self._generation

    def changed(self) -> None:
        """Call after committing a change that moves traffic."""
        with self._lock:
            self._generation += 1

    def read(self) -> RoutingSnapshot:
        generation = self._generation  # before reading: a change committed meanwhile bumps it again
        with self.sessions() as s:
            deps = {d.id: d.name for d in s.scalars(select(Deployment)).all()}
            versions = s.scalars(select(Version)).all()
            envs = s.scalars(select(Environment)).all()
            ready = s.execute(select(Replica.id, Replica.deployment, Replica.version, Replica.url, Replica.pool)
                              .where(Replica.state == "ready")).all()
            home = {p.name for p in s.scalars(select(Pool)).all() if (p.labels or {}).get("default")} or {"local"}
            targets = {(v.deployment_id, v.number): VersionTarget(v.number, CONFIGS.get(v))
                       for v in versions}
        out: dict[str, DeploymentTargets] = {}
        for dep_id, name in deps.items():
            out[name] = DeploymentTargets(
                name,
                {e.name: env_traffic(e) for e in envs if e.deployment_id == dep_id},
                {e.name: e.pending_version for e in envs if e.deployment_id == dep_id and e.pending_version},
                {n: t for (d, n), t in targets.items() if d == dep_id})
        for rid, dep, number, url, pool in ready:
            d = out.get(dep)
            if d is not None and url and number in d.versions:
                d.versions[number].replicas.append((rid, url))
                if pool not in home:
                    d.versions[number].remote.add(rid)
        return RoutingSnapshot(generation, out)
