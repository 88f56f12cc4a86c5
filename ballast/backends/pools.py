"""Several capacity pools behind the one Backend protocol the control plane drives.

Each pool is a backend of its own (a set of local processes, or a Ray cluster) named after the pool; a
replica's spec says which pool it was placed in and its handle carries that pool's name back, so every later
call (stop, inspect, logs) reaches the backend that runs it. The platform's own backend is the default pool.
A pool whose backend cannot be built (a Ray cluster that does not answer) is kept with the reason, which the
control plane's pool health check reports, rather than failing the whole platform. Each Ray pool has an agent
process of its own (`ray.RayBackend`), so any number of Ray clusters can be pools of one platform.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ballast.backends.base import Backend, ReplicaHandle, ReplicaSpec, ReplicaStatus
from ballast.backends.local import LocalBackend

log = logging.getLogger("ballast.backends")
CHECK_EVERY_S = 2.0  # a remote pool's backend is asked at most this often whether it answers
BUILD_RETRY_S = 30.0  # a pool whose backend could not be built is tried again after this
FIRST_BUILD_WAIT_S = 120.0  # the first sync waits this long for the pools' backends (see `sync`)
Factory = Callable[[str, str, str | None], Backend]  # (pool name, kind, address) -> its backend


def backend_kind(backend: Backend) -> str:
    return "local" if isinstance(backend, LocalBackend) else "ray"


def member_factory(instance_id: str, logs_dir: Path | None, command: list[str] | None,
                   extra_args: list[str] | None) -> Factory:
    """Builds a pool's backend the way the platform built its own (same instance id, logs, replica command)."""

    def build(name: str, kind: str, address: str | None) -> Backend:
        logs = logs_dir / "_pools" / name if logs_dir is not None else None  # each pool's replica logs apart
        if kind == "local":
            return LocalBackend(instance_id, logs_dir=logs, command=command, extra_args=extra_args, name=name)
        if kind == "ray":
            from ballast.backends.ray import RayBackend  # optional dependency

            return RayBackend(instance_id, address=address, logs_dir=logs, command=command, extra_args=extra_args,
                              name=name)
        raise ValueError(f"unknown pool kind {kind!r} (local or ray)")

    return build


def _factory_like(default: Backend) -> Factory:
    return member_factory(getattr(default, "instance_id", "ballast"), getattr(default, "logs_dir", None),
                          getattr(default, "command", None), getattr(default, "extra_args", None))


class PoolBackend:
    """Dispatches each call to the backend of the replica's pool."""

    def __init__(self, default: Backend, factory: Factory | None = None):
        self.name = default.name
        self.default = default
        self.factory = factory or _factory_like(default)
        self.members: dict[str, Backend] = {default.name: default}
        self.broken: dict[str, str] = {}  # pool -> why its backend could not be built
        self._building: set[str] = set()
        self._retry_at: dict[str, float] = {}
        self._checked: dict[str, tuple[float, str | None]] = {}  # pool -> (when, result) of its last check
        self._synced = False

    def sync(self, pools: builtins.list[tuple[str, str, str | None]]) -> None:
        """Build the backends of pools added since the last call (name, kind, address), each in a thread of its
        own: connecting to a Ray cluster that does not answer can take a minute, and must not stall the loop.
        The first call waits for them (up to FIRST_BUILD_WAIT_S): a restarted platform re-adopts the replicas
        of every pool, so it must reach each pool before it judges them."""
        wanted = {name for name, _kind, _address in pools}
        for gone in [n for n in self.members if n not in wanted and n != self.name]:
            close = getattr(self.members.pop(gone), "close", None)  # removed (only ever empty)
            if close is not None:
                close()
        threads = [t for t in (self._sync_one(name, kind, address) for name, kind, address in pools) if t]
        if not self._synced:
            self._synced = True
            deadline = time.monotonic() + FIRST_BUILD_WAIT_S
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))

    def _sync_one(self, name: str, kind: str, address: str | None) -> threading.Thread | None:
        if name in self.members or name in self._building:
            return None
        if name in self.broken and time.monotonic() < self._retry_at.get(name, 0.0):
            return None
        self._building.add(name)
        if kind == "local":  # a few attributes: built at once
            self._build(name, kind, address)
            return None
        self.broken.setdefault(name, "connecting to its backend")
        thread = threading.Thread(target=self._build, args=(name, kind, address), daemon=True,
                                  name=f"ballast-pool-{name}")
        thread.start()
        return thread

    def _build(self, name: str, kind: str, address: str | None) -> None:
        """Pools are built side by side: each Ray pool connects through an agent process of its own."""
        reason = None
        try:
            self.members[name] = self.factory(name, kind, address)
        except Exception as e:
            reason = f"cannot reach its backend: {type(e).__name__}: {e}"
        if reason is None:
            self.broken.pop(name, None)
        else:
            if self.broken.get(name) != reason:
                log.warning("pool %s: %s", name, reason)
            self.broken[name] = reason
            self._retry_at[name] = time.monotonic() + BUILD_RETRY_S
        self._building.discard(name)

    def check(self, pool: str) -> str | None:
        """None when the pool's backend answers; else why it does not (the pool is then down)."""
        member = self.members.get(pool)
        if member is None and pool in self.broken:
            return self.broken[pool]
        if member is None:
            return "no backend for this pool"
        ping = getattr(member, "ping", None)
        if ping is None:  # local processes: this machine answers
            return None
        last = self._checked.get(pool)
        if last is not None and time.monotonic() - last[0] < CHECK_EVERY_S:
            return last[1]
        try:
            ping()
            reason = None
        except Exception as e:
            reason = f"its cluster does not answer: {type(e).__name__}: {e}"
        self._checked[pool] = (time.monotonic(), reason)
        return reason

    def _of(self, pool: str) -> Backend | None:
        return self.members.get(pool or self.name)

    # ---- protocol ------------------------------------------------------------------------------
    def _fits_in(self, spec: ReplicaSpec, pool: str) -> str | None:
        member = self._of(pool)
        if member is None:
            return self.broken.get(pool) or f"no usable pool for it ({pool or 'none'})"
        return member.fits(spec)

    def _where(self, spec: ReplicaSpec) -> tuple[str | None, str | None]:
        """The pool to start it in (its own first, then its fallbacks in order), or why none can hold it now."""
        reasons: builtins.list[str] = []
        for pool in [spec.pool, *[p for p in spec.fallback if p != spec.pool]]:
            why = self._fits_in(spec, pool)
            if why is None:
                return pool, None
            reasons.append(why if not reasons and not spec.fallback else f"{pool or self.name}: {why}")
        return None, reasons[0] if len(reasons) == 1 else "no pool can hold it now: " + "; ".join(reasons)

    def fits(self, spec: ReplicaSpec) -> str | None:
        return self._where(spec)[1]

    def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        """In its own pool, or the first fallback with the resources. `spec.pool` becomes the pool tried (so a
        failed start counts against that pool), and the handle names the pool it runs in."""
        pool, _why = self._where(spec) if spec.fallback else (spec.pool, None)
        if pool is not None and pool != spec.pool:
            log.info("replica %s: pool %s lacks the resources; starting it in %s", spec.replica_id, spec.pool, pool)
            spec.pool = pool
        member = self._of(spec.pool)
        if member is None:
            raise RuntimeError(f"pool {spec.pool!r} has no backend")
        return member.start(spec)

    def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        member = self._of(handle.pool)
        if member is not None:
            member.stop(handle, grace_s)

    def list(self) -> builtins.list[ReplicaHandle]:
        out: builtins.list[ReplicaHandle] = []
        for name, member in list(self.members.items()):
            try:
                out += member.list()
            except Exception as e:  # an unreachable pool lists nothing; its health check says why
                log.warning("pool %s: cannot list replicas: %s", name, e)
        return out

    def inspect(self, handle: ReplicaHandle) -> ReplicaStatus:
        member = self._of(handle.pool)
        if member is None:
            return ReplicaStatus(False, None, f"pool {handle.pool!r} has no backend")
        return member.inspect(handle)

    def logs(self, handle: ReplicaHandle, tail: int) -> builtins.list[str]:
        member = self._of(handle.pool)
        return member.logs(handle, tail) if member is not None else []

    def rotate(self, handle: ReplicaHandle) -> None:
        rotate = getattr(self._of(handle.pool), "rotate", None)
        if rotate is not None:
            with contextlib.suppress(OSError):
                rotate(handle)
