"""The backend protocol: where replicas run. Small on purpose, so a Ray cluster or a pool in another
region implements the same five operations as local processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass
class ReplicaSpec:
    replica_id: str
    deployment: str
    version: int
    package_path: Path
    isolation: bool = True
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class ReplicaHandle:
    replica_id: str
    url: str
    pid: int | None = None
    port: int | None = None
    log_path: str | None = None
    pool: str = "local"


class Backend(Protocol):
    name: str

    def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        """Start a replica; returns at once (readiness is probed by the reconciler)."""

    def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        """Graceful stop: SIGTERM (the replica drains), then a hard kill after `grace_s`."""

    def alive(self, handle: ReplicaHandle) -> bool:
        """Whether the replica's process (or actor) still exists."""

    def adopt(self, handle: ReplicaHandle) -> bool:
        """After a platform restart: take over a replica started by an earlier platform process."""

    def logs(self, handle: ReplicaHandle, tail: int) -> list[str]:
        """The last `tail` lines the replica wrote."""
