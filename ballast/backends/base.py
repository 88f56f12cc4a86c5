"""The backend protocol: where replicas run.

Small on purpose, so a Ray cluster or a pool of capacity in another region implements the same
operations as local processes: say whether a replica fits, start a replica of a version, stop it,
list what runs, inspect one, read its logs. Health (readiness, liveness) is probed over HTTP by the
reconciler, not here, so a backend only has to say whether the replica's process (or actor) exists.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ballast.config import ResourcesConfig


@dataclass
class ReplicaSpec:
    """What to run: one replica of one version of a deployment."""

    replica_id: str
    deployment: str
    version: int
    package_path: Path
    env: dict[str, str] = field(default_factory=dict)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)  # ballast.yaml `resources`: placement
    pool: str = ""  # the capacity pool chosen for it ("": the backend's own)
    fallback: list[str] = field(default_factory=list)  # other pools it may run in when `pool` lacks the resources


@dataclass
class ReplicaHandle:
    """Where a replica runs; what the store keeps so a restarted platform can find it again."""

    replica_id: str
    url: str | None = None
    pid: int | None = None
    port: int | None = None
    log_path: str | None = None
    pool: str = "local"
    data: dict[str, Any] = field(default_factory=dict)  # backend-specific (actor name, node, cluster, ...)


@dataclass
class ReplicaStatus:
    alive: bool
    exit_code: int | None = None
    detail: str = ""


class Backend(Protocol):
    """One pool of capacity. `name` is the pool name shown for each replica."""

    name: str

    def fits(self, spec: ReplicaSpec) -> str | None:
        """None if the replica can start now; else why not ("no pool has 1 x H100 free"): it stays pending."""

    def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        """Start a replica; returns at once (readiness is probed by the reconciler)."""

    def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        """Graceful stop: SIGTERM (the replica drains), then a hard kill after `grace_s`. Blocking."""

    def list(self) -> list[ReplicaHandle]:
        """Replicas this platform instance started that still run (used to re-adopt and to find orphans)."""

    def inspect(self, handle: ReplicaHandle) -> ReplicaStatus:
        """Whether the replica's process (or actor) still exists; also re-adopts it after a platform restart."""

    def logs(self, handle: ReplicaHandle, tail: int) -> builtins.list[str]:  # `list` is a method here
        """The last `tail` lines the replica wrote."""
