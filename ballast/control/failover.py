"""Pool failover, one step per reconcile tick.

A pool is down when its backend does not answer (`PoolBackend.check`), when every replica it runs failed
its health this tick, or when every start tried in it last tick failed. Its replicas are stopped at once
(they serve nothing) and the scaling pass places their replacements in the other pools; the gateway stops
routing to them as soon as they leave the ready set. A down pool is tried again after a backoff: when its
backend answers it takes replicas again, and a ready replica there resets its failure count.

Replica failures alone never take down the last usable pool: a version that crashes everywhere is a broken
version, not a lost pool, and moving it around would only take every pool down with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ballast.backends.pools import PoolBackend, backend_kind
from ballast.control.actuator import Launched, ReplicaRow
from ballast.control.health import ReplicaState, Verdict
from ballast.control.pools import ensure_default, infos, mark_down, mark_up, retry_due, settle
from ballast.store import Pool, utcnow

RUNNING = (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.UNREADY)


def failing_pools(replicas: list[ReplicaRow], verdicts: dict[str, Verdict], checks: dict[str, str | None],
                  start_errors: dict[str, str], usable: set[str]) -> dict[str, str]:
    """Pools to fail over, with why (pure)."""
    down = {pool: why for pool, why in checks.items() if why}
    by_pool: dict[str, list[ReplicaRow]] = {}
    for r in replicas:
        if r.pid and r.state in RUNNING:
            by_pool.setdefault(r.pool, []).append(r)
    suspects: dict[str, str] = {}
    for pool, rows in by_pool.items():
        failed = [verdicts[r.id] for r in rows if r.id in verdicts and verdicts[r.id].kind == "fail"]
        if pool not in down and len(failed) == len(rows):
            suspects[pool] = f"all {len(rows)} of its replicas failed: {failed[0].reason}"
    for pool, why in start_errors.items():
        if pool not in down and pool not in by_pool:
            suspects[pool] = f"replicas cannot start there: {why}"
    if usable - set(down) - set(suspects):
        down.update(suspects)
    return {p: why for p, why in down.items() if p in usable}


@dataclass
class Failover:
    sessions: sessionmaker[Session]
    backend: PoolBackend
    start_errors: dict[str, str] = field(default_factory=dict)  # pool -> error, when every start there failed
    calm: bool = False  # every pool healthy with no failures to forget, as of the last sync
    _ensured: bool = False

    def sync(self) -> dict[str, str | None]:
        """Build backends of new pools and check each pool's backend (blocking: run it in a thread)."""
        if not self._ensured:
            with self.sessions() as s, s.begin():
                ensure_default(s, self.backend.name, backend_kind(self.backend.default))
            self._ensured = True
        with self.sessions() as s:
            rows = s.scalars(select(Pool)).all()
            pools = [(p.name, p.kind, p.address) for p in rows]
            self.calm = all(p.healthy and not p.failures for p in rows)
        self.backend.sync(pools)
        return {name: self.backend.check(name) for name, _kind, _address in pools}

    def launched(self, specs_pool: dict[str, str], results: list[Launched]) -> None:
        """Remember pools where every start failed (`specs_pool`: replica id -> pool)."""
        tried: dict[str, list[str | None]] = {}
        for res in results:
            if res.pending is None:
                tried.setdefault(specs_pool.get(res.replica_id, ""), []).append(res.error)
        self.start_errors = {pool: errors[0] or "" for pool, errors in tried.items()
                             if pool and errors and all(errors)}

    def step(self, replicas: list[ReplicaRow], verdicts: dict[str, Verdict],
             checks: dict[str, str | None]) -> tuple[list[ReplicaRow], bool]:
        """One transaction: fail pools over, bring due ones back. Returns (replicas to stop, traffic moved)."""
        if self.calm and not self.start_errors and not any(checks.values()) and not any(
                v.kind == "fail" for v in verdicts.values()):
            return [], False  # the common tick: nothing to fail over, bring back or forget
        now = utcnow()
        stops: list[ReplicaRow] = []
        with self.sessions() as s, s.begin():
            usable = {p.name for p in infos(s, self.backend.name) if p.usable}
            down = failing_pools(replicas, verdicts, checks, self.start_errors, usable)
            for pool, why in sorted(down.items()):
                stops += [ReplicaRow.of(r) for r in mark_down(s, pool, why, now)]
            for pool in retry_due(s, now):
                if pool not in down and not checks.get(pool):
                    mark_up(s, pool)
            settle(s, {r.pool for r in replicas if r.state == ReplicaState.READY})
        self.start_errors = {}
        return stops, bool(stops)
