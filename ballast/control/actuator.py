"""The actuator: every backend call the control plane makes, always outside database transactions.

Starting a process, inspecting one or reading its log can be slow (a remote cluster, a loaded
machine); none of that may hold a store transaction or the control lock. The reconciler decides in a
transaction, commits, then asks the actuator to act, and records the results in a second one.
Stops are graceful and run in the background: drain (`drain_s`, for routers to notice), SIGTERM,
then a hard kill after the version's `runtime.shutdown_grace_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ballast.backends import Backend, ReplicaHandle, ReplicaSpec, ReplicaStatus
from ballast.store import Replica

log = logging.getLogger("ballast.control")


@dataclass
class ReplicaRow:
    """A replica row copied out of a transaction (ORM objects do not outlive their session)."""

    id: str
    deployment: str
    version: int
    state: str
    pid: int | None
    url: str | None
    port: int | None
    log_path: str | None
    pool: str
    started_at: datetime | None
    revision: int
    data: dict[str, Any]

    @classmethod
    def of(cls, r: Replica) -> ReplicaRow:
        return cls(r.id, r.deployment, r.version, r.state, r.pid, r.url, r.port, r.log_path, r.pool, r.started_at,
                   r.revision, dict(r.data or {}))

    def handle(self) -> ReplicaHandle:
        return ReplicaHandle(self.id, self.url, self.pid, self.port, self.log_path, self.pool, dict(self.data))


@dataclass
class Launched:
    """The outcome of one start: a handle, a reason to stay pending, or an error."""

    replica_id: str
    handle: ReplicaHandle | None = None
    pending: str | None = None
    error: str | None = None


class Actuator:
    def __init__(self, backend: Backend, drain_s: float, on_removed: Callable[[ReplicaRow], None]):
        self.backend = backend
        self.drain_s = drain_s
        self.on_removed = on_removed  # deletes the row (a transaction of its own), after the process is gone
        self.stopping: dict[str, asyncio.Task[None]] = {}

    async def inspect(self, rows: list[ReplicaRow]) -> dict[str, ReplicaStatus]:
        def run() -> dict[str, ReplicaStatus]:
            return {r.id: self.backend.inspect(r.handle()) for r in rows}

        return await asyncio.to_thread(run) if rows else {}

    async def tails(self, rows: list[ReplicaRow], n: int) -> dict[str, list[str]]:
        def run() -> dict[str, list[str]]:
            out = {}
            for r in rows:
                with contextlib.suppress(OSError):
                    out[r.id] = self.backend.logs(r.handle(), n)
            return out

        return await asyncio.to_thread(run) if rows else {}

    async def launch(self, specs: list[ReplicaSpec]) -> list[Launched]:
        """Start what fits; what the backend lacks resources for stays pending with the reason."""

        def run() -> list[Launched]:
            out = []
            for spec in specs:
                reason = self.backend.fits(spec)
                if reason:
                    out.append(Launched(spec.replica_id, pending=reason))
                    continue
                try:
                    out.append(Launched(spec.replica_id, handle=self.backend.start(spec)))
                except Exception as e:
                    out.append(Launched(spec.replica_id, error=f"could not start: {type(e).__name__}: {e}"))
            return out

        return await asyncio.to_thread(run) if specs else []

    def stop(self, snap: ReplicaRow, *, drain: bool, remove: bool, grace: float = 30.0) -> asyncio.Task[None]:
        """Stop in the background; with `remove`, the row goes once the process is gone."""

        async def run() -> None:
            try:
                if drain and snap.pid:
                    await asyncio.sleep(self.drain_s)
                if snap.pid:
                    await asyncio.to_thread(self.backend.stop, snap.handle(), grace)
                if remove:
                    await asyncio.to_thread(self.on_removed, snap)
            except Exception:
                log.exception("stopping replica %s failed", snap.id)
            finally:
                if remove:
                    self.stopping.pop(snap.id, None)

        task = asyncio.get_running_loop().create_task(run())
        if remove:
            self.stopping[snap.id] = task
        return task

    async def stop_all(self, rows: list[ReplicaRow]) -> None:
        """Platform shutdown: every replica, in parallel, and then anything of ours still running."""
        stops = [self.stop(r, drain=False, remove=True) for r in rows if r.id not in self.stopping]
        pending = [*self.stopping.values(), *stops]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for h in await asyncio.to_thread(self.backend.list):
            await asyncio.to_thread(self.backend.stop, h, 5.0)

    async def rotate(self, rows: list[ReplicaRow]) -> None:
        rotate = getattr(self.backend, "rotate", None)
        if rotate is None:
            return

        def run() -> None:
            for r in rows:
                with contextlib.suppress(OSError):
                    rotate(r.handle())

        await asyncio.to_thread(run)
