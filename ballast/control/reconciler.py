"""The reconcile loop: drive the backend toward the desired state in the store, write observed state back.

Each tick:
1. plan (one transaction, under the control lock): copy the desired state out of the store, run the
   pure planner (promotions, canary steps, desired counts, retirement), write back what it changed;
2. observe, outside any transaction: probe replicas over HTTP (`Prober`) and ask the backend whether
   their processes exist (`Actuator`);
3. decide (one transaction): apply the health state machine's verdicts, scale each version toward its
   desired count, mark replicas to stop;
4. act, outside any transaction: start processes (or leave them pending when the backend lacks the
   resources), then record the handles in a last short transaction; stops run in the background.

Everything the loop needs survives a platform restart: replica rows carry pid, port and start time,
and the first tick re-adopts live replicas and stops processes that belong to nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import delete, select

from ballast.backends import Backend, ReplicaSpec, ReplicaStatus
from ballast.backends.pools import PoolBackend
from ballast.control.actuator import Actuator, Launched, ReplicaRow
from ballast.control.autoscaler import Autoscaler
from ballast.control.chain_keys import ChainKeys
from ballast.control.events import add_event
from ballast.control.failover import Failover
from ballast.control.health import ACTIVE_STATES, Probe, ReplicaState, Verdict, assess
from ballast.control.lease import Lease
from ballast.control.placement import Placement
from ballast.control.planner import Key, VersionPlan
from ballast.control.pools import infos
from ballast.control.probes import Prober
from ballast.control.service import ControlPlane
from ballast.control.store_io import DevWatcher, apply_verdicts, plan_in_store, record_launches, scale
from ballast.control.times import aware
from ballast.store import Replica, utcnow

log = logging.getLogger("ballast.control")
LOG_TAIL_ON_ERROR = 20


@dataclass
class Plan:
    versions: dict[Key, VersionPlan]
    replicas: list[ReplicaRow]


def new_replica_id() -> str:
    return "r-" + os.urandom(5).hex()


class ControlMetrics(Collector):
    """Cold starts (counter and duration) and replicas by state, read from the last tick at scrape time."""

    def __init__(self, reconciler: Reconciler, registry: CollectorRegistry):
        self.reconciler = reconciler
        self.cold_starts = Counter("ballast_cold_starts", "Replicas that started and became ready.",
                                   ["deployment", "version"], registry=registry)
        self.cold_start_s = Histogram("ballast_cold_start_seconds", "Time from starting a replica to its first "
                                      "ready probe.", ["deployment"], registry=registry,
                                      buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600))
        registry.register(self)

    def collect(self) -> Any:
        g = GaugeMetricFamily("ballast_replicas", "Replicas by deployment, version and state "
                              "(pending, starting, ready, unready, crashloop, stopping).",
                              labels=["deployment", "version", "state"])
        for (dep, ver, state), n in sorted(self.reconciler.replica_counts.items()):
            g.add_metric([dep, str(ver), state], n)
        yield g
        d = GaugeMetricFamily("ballast_desired_replicas", "Desired replicas by deployment and version.",
                              labels=["deployment", "version"])
        for (dep, ver), n in sorted(self.reconciler.desired_counts.items()):
            d.add_metric([dep, str(ver)], n)
        yield d

    def ready(self, deployment: str, version: int, cold_s: float | None) -> None:
        if cold_s is not None:
            self.cold_starts.labels(deployment, str(version)).inc()
            self.cold_start_s.labels(deployment).observe(cold_s)


class Reconciler:
    def __init__(self, control: ControlPlane, backend: Backend, *, autoscaler: Autoscaler | None = None,
                 registry: CollectorRegistry | None = None, lease: Lease | None = None):
        self.control = control
        self.lease = lease  # several platforms on one store (`ballast up --ha`): only the holder reconciles
        # Every replica runs in a capacity pool; the platform's own backend is the default one.
        self.backend = backend if isinstance(backend, PoolBackend) else PoolBackend(backend)
        self.failover = Failover(control.sessions, self.backend)
        self.autoscaler = autoscaler or Autoscaler()
        self.replica_counts: dict[tuple[str, int, str], int] = {}
        self.desired_counts: dict[Key, int] = {}
        self.metrics = ControlMetrics(self, registry) if registry is not None else None
        self.sessions = control.sessions
        self.settings = control.settings
        self.actuator = Actuator(self.backend, self.settings.drain_s, self._remove)
        self.prober = Prober()
        self.dev = DevWatcher()
        self.chain_keys = ChainKeys(control.sessions)  # step replicas of a chain get its internal key
        self._live_failures: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._adopted = False
        self._last_rotate = 0.0
        self.ticks = 0
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.chain_keys.secret, "")  # read (or make) the platform secret outside any tick
        await self.prober.start()
        self._task = asyncio.create_task(self._run(), name="ballast-reconciler")

    def wake(self) -> None:
        """Run the next tick now (after an API call changed desired state); callable from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        while True:
            try:
                if await self._lead():
                    await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile tick failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.interval_s)
            self._wake.clear()

    async def _lead(self) -> bool:
        """Without a lease this process reconciles; with one, while it holds the lease (re-adopting the
        replicas each time it takes over, since another process ran them meanwhile)."""
        if self.lease is None:
            return True
        held = await asyncio.to_thread(self.lease.hold)
        if not held:
            self._adopted = False
        return held

    async def shutdown(self) -> None:
        """Stop the loop, then every replica (gracefully, in parallel); no process is left behind. With a
        lease the replicas belong to every platform on the store: they keep running, and the lease is handed
        over at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.lease is not None:
            if self.actuator.stopping:
                await asyncio.gather(*self.actuator.stopping.values(), return_exceptions=True)
            await asyncio.to_thread(self.lease.release)
            await self.prober.close()
            return
        await self.actuator.stop_all(await asyncio.to_thread(self._load_replicas))
        await self.prober.close()

    # ---- one tick ------------------------------------------------------------------------------
    async def tick(self) -> None:
        checks = await asyncio.to_thread(self.failover.sync)  # before adopting: replicas of every pool are found
        if not self._adopted:
            await self._adopt()
            self._adopted = True
        self.autoscaler.observe()
        plan = await asyncio.to_thread(self._plan)
        counts: dict[tuple[str, int, str], int] = {}
        for r in plan.replicas:
            counts[(r.deployment, r.version, r.state)] = counts.get((r.deployment, r.version, r.state), 0) + 1
        self.replica_counts = counts
        self.desired_counts = {k: vp.desired for k, vp in plan.versions.items()}
        self.autoscaler.forget(set(plan.versions))
        probes = await self.prober.collect(plan.replicas, lambda r: self._period(plan, r))
        running = [r for r in plan.replicas if r.pid and r.state in (ReplicaState.STARTING, ReplicaState.READY,
                                                                     ReplicaState.UNREADY)]
        verdicts = self._assess(plan, probes, await self.actuator.inspect(running))
        await self._fail_over(plan, verdicts, checks)
        failed = [r for r in running if verdicts.get(r.id, Verdict()).kind == "fail"]
        tails = await self.actuator.tails(failed, LOG_TAIL_ON_ERROR)
        to_stop, launches = await asyncio.to_thread(self._decide, plan, verdicts, tails)
        for snap, drain, remove, grace in to_stop:
            if snap.id not in self.actuator.stopping:
                self.actuator.stop(snap, drain=drain, remove=remove, grace=grace)
        if launches:
            results = await self.actuator.launch(launches)
            self.failover.launched({spec.replica_id: spec.pool for spec in launches}, results)
            leftovers = await asyncio.to_thread(self._record, plan, results)
            for snap in leftovers:  # started for a row that went away meanwhile
                self.actuator.stop(snap, drain=False, remove=False, grace=5.0)
        if time.monotonic() - self._last_rotate > 10:
            self._last_rotate = time.monotonic()
            await self.actuator.rotate(plan.replicas)
        self.ticks += 1

    async def _fail_over(self, plan: Plan, verdicts: dict[str, Verdict], checks: dict[str, str | None]) -> None:
        """Pools that went down: stop their replicas now (replacements are placed by this tick's scaling)."""
        stops, moved = await asyncio.to_thread(self.failover.step, plan.replicas, verdicts, checks)
        for snap in stops:
            verdicts.pop(snap.id, None)
            if snap.id not in self.actuator.stopping:
                self.actuator.stop(snap, drain=False, remove=True, grace=5.0)
        if moved:
            self.control.routing.changed()

    def _period(self, plan: Plan, r: ReplicaRow) -> float:
        vp = plan.versions.get((r.deployment, r.version))
        return vp.config.health.liveness_period_s if vp else 10.0

    def _load_replicas(self) -> list[ReplicaRow]:
        with self.sessions() as s:
            return [ReplicaRow.of(r) for r in s.scalars(select(Replica)).all()]

    async def _adopt(self) -> None:
        """After a (re)start: replicas in the store that still run are kept; processes of ours that the
        store does not know (or that it never recorded a pid for) are orphans and are stopped."""
        rows = {r.id: r for r in await asyncio.to_thread(self._load_replicas)}
        for h in await asyncio.to_thread(self.backend.list):
            row = rows.get(h.replica_id)
            if row is None or row.pid is None or (h.pid is not None and row.pid != h.pid):
                log.warning("stopping orphan replica process %s (pid %s)", h.replica_id, h.pid)
                await asyncio.to_thread(self.backend.stop, h, 5.0)
                with self.sessions() as s, s.begin():
                    add_event(s, row.deployment if row else "-", "orphan_stopped",
                              f"stopped orphan replica process {h.replica_id} (pid {h.pid})", pid=h.pid)
        with_pid = [r for r in rows.values() if r.pid]
        statuses = await self.actuator.inspect(with_pid)
        adopted = [r for r in with_pid if statuses[r.id].alive]
        if adopted:
            with self.sessions() as s, s.begin():
                for r in adopted:
                    add_event(s, r.deployment, "replica_adopted", f"replica {r.id} (pid {r.pid}, {r.state}) "
                              "re-adopted after a platform restart", replica=r.id, version=r.version)

    # ---- plan ----------------------------------------------------------------------------------
    def _plan(self) -> Plan:
        with self.control.lock, self.sessions() as s, s.begin():
            result = plan_in_store(s, self.control, self.autoscaler, self.dev)
            rows = [ReplicaRow.of(r) for r in s.scalars(select(Replica)).all()]
        if result.routing_changed:
            self.control.routing.changed()
        return Plan(result.versions, rows)

    # ---- decide --------------------------------------------------------------------------------
    def _assess(self, plan: Plan, probes: dict[str, Probe], statuses: dict[str, ReplicaStatus]) -> dict[str, Verdict]:
        """The health state machine over what was observed this tick (pure; no store, no backend)."""
        now = utcnow()
        out: dict[str, Verdict] = {}
        for r in plan.replicas:
            vp = plan.versions.get((r.deployment, r.version))
            status = statuses.get(r.id)
            if vp is None or status is None:
                continue
            started = aware(r.started_at)
            age = (now - started).total_seconds() if started else None
            v = assess(r.state, status.alive, status.detail, probes.get(r.id), self._live_failures.get(r.id, 0),
                       age, vp.config.health)
            self._live_failures[r.id] = v.live_failures
            if v.kind != "none":
                out[r.id] = v
        return out

    def _decide(self, plan: Plan, verdicts: dict[str, Verdict], tails: dict[str, list[str]]) -> tuple[
            list[tuple[ReplicaRow, bool, bool, float]], list[ReplicaSpec]]:
        """One transaction: verdicts, scaling, stops. Returns what to stop and what to start."""
        now = utcnow()
        with self.sessions() as s, s.begin():
            rows = {r.id: r for r in s.scalars(select(Replica)).all()}
            to_stop, routed = apply_verdicts(s, rows, plan.versions, verdicts, tails, now, self.settings,
                                             self.actuator.stopping, self._on_ready)
            for rid, v in verdicts.items():
                if v.kind == "fail":
                    self._live_failures.pop(rid, None)
                    self.prober.forget(rid)
            placement = Placement.of(infos(s, self.backend.name), [
                (r.deployment, r.version, r.pool) for r in rows.values()
                if r.state in ACTIVE_STATES and r.id not in self.actuator.stopping])
            routed |= scale(s, rows, plan.versions, self.actuator.stopping, now, new_replica_id, placement, to_stop)
            launches = [self._spec(r, plan.versions[(r.deployment, r.version)], placement) for r in rows.values()
                        if _due(r, now) and r.id not in self.actuator.stopping and r.pool
                        and (r.deployment, r.version) in plan.versions]
        if routed:
            self.control.routing.changed()
        return to_stop, launches

    def _on_ready(self, row: Replica, cold_s: float | None) -> None:
        self.prober.probed_now(row.id)
        if self.metrics is not None:
            self.metrics.ready(row.deployment, row.version, cold_s)

    def _spec(self, r: Replica, vp: VersionPlan, placement: Placement) -> ReplicaSpec:
        fallback = [p.name for p in placement.candidates(vp.config) if p.name != r.pool]  # when r.pool lacks room
        return ReplicaSpec(replica_id=r.id, deployment=vp.deployment, version=vp.number,
                           package_path=Path(vp.package_path), resources=vp.config.resources, pool=r.pool,
                           env=self.chain_keys.replica_env(vp.deployment, vp.config), fallback=fallback)

    def _record(self, plan: Plan, results: list[Launched]) -> list[ReplicaRow]:
        with self.sessions() as s, s.begin():
            leftovers = record_launches(s, results, plan.versions, utcnow(), self.settings)
        for res in results:
            if res.handle is not None:
                self._live_failures.pop(res.replica_id, None)
                self.prober.forget(res.replica_id)
        return leftovers

    def _remove(self, snap: ReplicaRow) -> None:
        with self.sessions() as s, s.begin():
            s.execute(delete(Replica).where(Replica.id == snap.id))
            add_event(s, snap.deployment, "replica_stopped", f"replica {snap.id} stopped", replica=snap.id,
                      version=snap.version)
        self._live_failures.pop(snap.id, None)


def _due(r: Replica, now: datetime) -> bool:
    """Needs a process: new, replaced, waiting for resources, or crash-looping with its backoff over."""
    if r.pid is not None:
        return False
    if r.state in (ReplicaState.STARTING, ReplicaState.PENDING):
        return True
    return r.state == ReplicaState.CRASHLOOP and (r.next_start_at is None or aware(r.next_start_at) <= now)
