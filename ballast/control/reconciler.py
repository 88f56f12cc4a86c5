"""The reconcile loop: drive the backend toward the desired state in the store, write observed state back.

Each tick:
1. plan (one transaction, under the control lock): land pending promotions whose version has ready
   replicas, step canaries, compute every version's desired replica count, start the retirement
   grace of versions that left every environment;
2. probe (concurrently, over HTTP): readiness of starting replicas every tick, liveness (and
   readiness) of running ones every `liveness_period_s`;
3. act: replace dead or failing replicas (with exponential backoff and a visible `crashloop` state),
   stop replicas that never became ready within `startup_timeout_s` (with their last log lines),
   start and stop replicas to match the desired counts.

Stops are graceful and run in the background: the replica leaves the routes (`stopping`), gets
`drain_s` for routers to notice, then SIGTERM, and SIGKILL after `runtime.shutdown_grace_s`.
Everything the loop needs survives a platform restart: replica rows carry pid, port and start time,
and the first tick re-adopts live replicas and stops processes that belong to nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import delete, select

from ballast.backends import Backend, ReplicaHandle, ReplicaSpec
from ballast.control.autoscaler import Autoscaler, Policy
from ballast.control.packages import source_signature
from ballast.control.service import ACTIVE_STATES, ControlPlane, add_event, aware, canary_percent_at
from ballast.package import IGNORED_NAMES
from ballast.store import Deployment, Environment, Replica, Version, utcnow

log = logging.getLogger("ballast.control")
LOG_TAIL_ON_ERROR = 20


@dataclass
class VersionPlan:
    deployment: str
    number: int
    desired: int
    revision: int
    package_path: str
    config: dict[str, Any]
    dev: bool

    def health(self, key: str, default: float) -> float:
        return float((self.config.get("health") or {}).get(key, default))

    @property
    def grace_s(self) -> float:
        return float((self.config.get("runtime") or {}).get("shutdown_grace_s", 30.0))


@dataclass
class ReplicaRow:
    id: str
    deployment: str
    version: int
    state: str
    pid: int | None
    url: str | None
    port: int | None
    log_path: str | None
    pool: str
    started_at: Any
    ready_at: Any
    restarts: int
    failures: int
    next_start_at: Any
    revision: int
    data: dict[str, Any]

    def handle(self) -> ReplicaHandle:
        return ReplicaHandle(self.id, self.url, self.pid, self.port, self.log_path, self.pool, dict(self.data or {}))


@dataclass
class Probe:
    ready: bool | None = None  # None: not probed
    live: bool | None = None
    reason: str = ""
    load_failed: bool = False


@dataclass
class _Memory:
    last_live: float = 0.0
    live_failures: int = 0


@dataclass
class Plan:
    versions: dict[tuple[str, int], VersionPlan]
    replicas: list[ReplicaRow]
    dev_paths: dict[tuple[str, int], str] = field(default_factory=dict)


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
                              "(starting, ready, unready, crashloop, stopping).",
                              labels=["deployment", "version", "state"])
        for (dep, ver, state), n in sorted(self.reconciler.replica_counts.items()):
            g.add_metric([dep, str(ver), state], n)
        yield g
        d = GaugeMetricFamily("ballast_desired_replicas", "Desired replicas by deployment and version.",
                              labels=["deployment", "version"])
        for (dep, ver), n in sorted(self.reconciler.desired_counts.items()):
            d.add_metric([dep, str(ver)], n)
        yield d


class Reconciler:
    def __init__(self, control: ControlPlane, backend: Backend, *, autoscaler: Autoscaler | None = None,
                 registry: CollectorRegistry | None = None):
        self.control = control
        self.backend = backend
        self.autoscaler = autoscaler or Autoscaler()
        self.replica_counts: dict[tuple[str, int, str], int] = {}
        self.desired_counts: dict[tuple[str, int], int] = {}
        self.metrics = ControlMetrics(self, registry) if registry is not None else None
        self.sessions = control.sessions
        self.settings = control.settings
        self._memory: dict[str, _Memory] = {}
        self._stopping: dict[str, asyncio.Task[None]] = {}
        self._inflight: dict[str, tuple[str, asyncio.Task[Probe]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._adopted = False
        self._dev_signatures: dict[tuple[str, int], Any] = {}
        self._last_dev_check = 0.0
        self._last_rotate = 0.0
        self.ticks = 0
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(2.0, connect=1.0), trust_env=False)
        self._task = asyncio.create_task(self._run(), name="ballast-reconciler")

    def wake(self) -> None:
        """Run the next tick now (after an API call changed desired state); callable from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile tick failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.interval_s)
            self._wake.clear()

    async def shutdown(self) -> None:
        """Stop the loop, then every replica (gracefully, in parallel); no process is left behind."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        rows = await asyncio.to_thread(self._load_replicas)
        stops = [self._stop_task(r, drain=False, remove=True) for r in rows if r.id not in self._stopping]
        pending = [*self._stopping.values(), *stops]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        # Anything of ours still running (started and not yet recorded, say) goes too.
        for h in await asyncio.to_thread(self.backend.list):
            await asyncio.to_thread(self.backend.stop, h, 5.0)
        for _url, task in self._inflight.values():
            task.cancel()
        if self._client is not None:
            await self._client.aclose()

    # ---- one tick ------------------------------------------------------------------------------
    async def tick(self) -> None:
        if not self._adopted:
            await asyncio.to_thread(self._adopt)
            self._adopted = True
        self.autoscaler.observe()
        plan = await asyncio.to_thread(self._plan)
        counts: dict[tuple[str, int, str], int] = {}
        for r in plan.replicas:
            counts[(r.deployment, r.version, r.state)] = counts.get((r.deployment, r.version, r.state), 0) + 1
        self.replica_counts = counts
        self.desired_counts = {k: vp.desired for k, vp in plan.versions.items()}
        self.autoscaler.forget(set(plan.versions))
        probes = await self._probe(plan)
        to_stop = await asyncio.to_thread(self._act, plan, probes)
        for snap, drain, remove, grace in to_stop:
            if snap.id not in self._stopping:
                self._stop_task(snap, drain=drain, remove=remove, grace=grace)
        if time.monotonic() - self._last_rotate > 10:
            self._last_rotate = time.monotonic()
            rotate = getattr(self.backend, "rotate", None)
            if rotate is not None:
                for snap in plan.replicas:
                    with contextlib.suppress(OSError):
                        await asyncio.to_thread(rotate, snap.handle())
        self.ticks += 1

    def _load_replicas(self) -> list[ReplicaRow]:
        with self.sessions() as s:
            return [_row(r) for r in s.scalars(select(Replica)).all()]

    def _adopt(self) -> None:
        """After a (re)start: replicas in the store that still run are kept; processes of ours that the
        store does not know are orphans and are stopped."""
        rows = {r.id: r for r in self._load_replicas()}
        for h in self.backend.list():
            row = rows.get(h.replica_id)
            if row is None or (row.pid is not None and h.pid is not None and row.pid != h.pid):
                log.warning("stopping orphan replica process %s (pid %s)", h.replica_id, h.pid)
                self.backend.stop(h, 5.0)
                with self.sessions() as s, s.begin():
                    add_event(s, row.deployment if row else "-", "orphan_stopped",
                              f"stopped orphan replica process {h.replica_id} (pid {h.pid})", pid=h.pid)
        adopted = [r for r in rows.values() if r.pid and self.backend.inspect(r.handle()).alive]
        if adopted:
            with self.sessions() as s, s.begin():
                for r in adopted:
                    add_event(s, r.deployment, "replica_adopted", f"replica {r.id} (pid {r.pid}, {r.state}) "
                              "re-adopted after a platform restart", replica=r.id, version=r.version)

    # ---- plan: promotions, canaries, desired counts ----------------------------------------------
    def _plan(self) -> Plan:
        now = utcnow()
        with self.control.lock, self.sessions() as s, s.begin():
            deps = {d.id: d for d in s.scalars(select(Deployment)).all()}
            versions = s.scalars(select(Version)).all()
            envs = s.scalars(select(Environment)).all()
            replicas = s.scalars(select(Replica)).all()
            ready: dict[tuple[str, int], int] = {}
            present: dict[tuple[str, int], int] = {}
            for r in replicas:
                present[(r.deployment, r.version)] = present.get((r.deployment, r.version), 0) + 1
                if r.state == "ready":
                    ready[(r.deployment, r.version)] = ready.get((r.deployment, r.version), 0) + 1
            by_number = {(v.deployment_id, v.number): v for v in versions}

            for e in envs:
                dep = deps.get(e.deployment_id)
                if dep is None:
                    continue
                if e.pending_version is not None:
                    if (e.deployment_id, e.pending_version) not in by_number:
                        e.pending_version = None
                    elif ready.get((dep.name, e.pending_version), 0) > 0:
                        self.control.apply_promotion(s, dep, e, e.pending_version, e.pending_canary_percent,
                                                     e.pending_ramp_s, e.pending_actor or "system")
                if e.canary_version is not None and e.canary_ramp_s > 0 and e.canary_started_at is not None:
                    elapsed = (now - aware(e.canary_started_at)).total_seconds()
                    pct = canary_percent_at(e.canary_step_percent or e.canary_percent, e.canary_ramp_s, elapsed)
                    if pct >= 100:
                        self.control.apply_promotion(s, dep, e, e.canary_version, 0, 0.0, "system",
                                                     kind="canary_completed")
                    elif pct != e.canary_percent:
                        e.canary_percent = pct
                        e.updated_at = now
                        add_event(s, dep.name, "canary_step", f"{e.name}: version {e.canary_version} now gets "
                                  f"{pct}% of traffic", env=e.name, version=e.canary_version, percent=pct)

            in_use: dict[tuple[int, int], list[Environment]] = {}
            for e in envs:
                for n in (e.version, e.canary_version, e.pending_version):
                    if n is not None:
                        in_use.setdefault((e.deployment_id, n), []).append(e)

            out: dict[tuple[str, int], VersionPlan] = {}
            for v in versions:
                dep = deps.get(v.deployment_id)
                if dep is None:
                    continue
                users = in_use.get((v.deployment_id, v.number))
                key = (dep.name, v.number)
                if users:
                    lo = max(e.min_replicas if e.min_replicas is not None else v.min_replicas for e in users)
                    hi = max(e.max_replicas if e.max_replicas is not None else v.max_replicas for e in users)
                    # A promotion waits for a ready replica and a canary must be serving: at least one.
                    if any(e.pending_version == v.number or e.canary_version == v.number for e in users):
                        lo = max(lo, 1)
                    desired = self.autoscaler.desired(key, Policy.from_config(v.config or {}, lo, hi), v.desired)
                    if v.retire_at is not None:
                        v.retire_at = None
                elif self.autoscaler.busy(key):
                    # Addressed directly (`chat:3`) although no environment uses it: serve, and retire later.
                    desired = max(v.desired, 1)
                    v.retire_at = now + timedelta(seconds=self.settings.retire_grace_s)
                else:
                    desired = v.desired
                    if v.desired > 0 or present.get((dep.name, v.number)):
                        if v.retire_at is None:
                            v.retire_at = now + timedelta(seconds=self.settings.retire_grace_s)
                            add_event(s, dep.name, "retiring", f"version {v.number} left every environment: it "
                                      f"drains and scales to zero after {self.settings.retire_grace_s:g}s "
                                      "(rollback is instant until then)", version=v.number)
                        elif now >= aware(v.retire_at) and v.desired > 0:
                            desired = 0
                            add_event(s, dep.name, "retired", f"version {v.number} scaled to zero",
                                      version=v.number)
                    else:
                        desired = 0
                if desired != v.desired:
                    if users:
                        add_event(s, dep.name, "autoscale", f"version {v.number}: {v.desired} -> {desired} replicas "
                                  f"(in flight now: {self.autoscaler.current(key):g})", version=v.number,
                                  previous=v.desired, desired=desired)
                    v.desired = desired
                out[(dep.name, v.number)] = VersionPlan(dep.name, v.number, desired, v.revision, v.package_path,
                                                        dict(v.config or {}), v.dev)

            # `ballast dev`: reload when the source changes (checked about once a second). A new dev version's
            # first signature is taken at once, before its replica starts, so no edit can slip in unseen.
            due = time.monotonic() - self._last_dev_check >= 1.0
            if due:
                self._last_dev_check = time.monotonic()
            for v in versions:
                dep = deps.get(v.deployment_id)
                if not v.dev or dep is None:
                    continue
                key = (dep.name, v.number)
                if not due and key in self._dev_signatures:
                    continue
                try:
                    sig = source_signature(Path(v.package_path), IGNORED_NAMES)
                except OSError:
                    continue
                old = self._dev_signatures.get(key)
                self._dev_signatures[key] = sig
                if old is not None and old != sig:
                    self.control.reload_dev(s, v, dep.name)
                    out[key].revision = v.revision
                    out[key].config = dict(v.config or {})
            rows = [_row(r) for r in replicas]
        return Plan(out, rows)

    # ---- probe ---------------------------------------------------------------------------------
    async def _probe(self, plan: Plan) -> dict[str, Probe]:
        """Start due probes and collect finished ones. Probes run as their own tasks, so a replica that
        hangs (its probes time out) never slows the reconciliation of the others."""
        now = time.monotonic()
        started: list[asyncio.Task[Probe]] = []
        for r in plan.replicas:
            if not r.url or not r.pid or r.state not in ("starting", "ready", "unready") or r.id in self._inflight:
                continue
            vp = plan.versions.get((r.deployment, r.version))
            mem = self._memory.setdefault(r.id, _Memory())
            if r.state != "starting":
                period = vp.health("liveness_period_s", 10.0) if vp else 10.0
                if now - mem.last_live < period:
                    continue
                mem.last_live = now
            task = asyncio.create_task(self._probe_one(r.url, live=True))
            self._inflight[r.id] = (r.url, task)
            started.append(task)
        if started:  # healthy replicas answer in milliseconds: use their answers in this tick
            await asyncio.wait(started, timeout=0.25)
        urls = {r.id: r.url for r in plan.replicas}
        results: dict[str, Probe] = {}
        for rid, (url, task) in list(self._inflight.items()):
            if not task.done():
                continue
            del self._inflight[rid]
            if urls.get(rid) != url:
                continue  # the replica was replaced meanwhile: the answer is about an old process
            try:
                results[rid] = task.result()
            except Exception as e:
                results[rid] = Probe(ready=False, live=False, reason=f"probe failed: {type(e).__name__}")
        return results

    async def _probe_one(self, url: str, live: bool) -> Probe:
        """Liveness first (a load failure or a hang shows there), then readiness."""
        assert self._client is not None
        p = Probe()
        if live:
            try:
                r = await self._client.get(url + "/health/live")
                p.live = r.status_code == 200
                if not p.live:
                    p.reason = _reason(r)
                    p.load_failed = "load failed" in p.reason
                    p.ready = False
                    return p
            except httpx.HTTPError as e:
                p.live = False
                p.ready = False
                p.reason = f"liveness probe failed: {type(e).__name__}"
                return p
        try:
            r = await self._client.get(url + "/health/ready")
            p.ready = r.status_code == 200
            if not p.ready:
                p.reason = _reason(r)
        except httpx.HTTPError as e:
            p.ready = False
            p.reason = f"readiness probe failed: {type(e).__name__}"
        return p

    # ---- act -----------------------------------------------------------------------------------
    def _act(self, plan: Plan, probes: dict[str, Probe]) -> list[tuple[ReplicaRow, bool, bool, float]]:
        now = utcnow()
        to_stop: list[tuple[ReplicaRow, bool, bool, float]] = []  # (row, drain, remove, grace)
        with self.sessions() as s, s.begin():
            rows = {r.id: r for r in s.scalars(select(Replica)).all()}
            for snap in plan.replicas:
                row = rows.get(snap.id)
                if row is None or row.id in self._stopping:
                    continue
                vp = plan.versions.get((row.deployment, row.version))
                if row.state == "stopping" or vp is None:
                    if vp is None and row.state != "stopping":
                        row.state = "stopping"
                        add_event(s, row.deployment, "replica_stopping", f"replica {row.id} belongs to no version; "
                                  "stopping it", replica=row.id, version=row.version)
                    to_stop.append((_row(row), True, True, vp.grace_s if vp else 30.0))
                    continue
                self._health(s, row, vp, probes.get(row.id), now, to_stop)

            # Scale each version toward its desired count; replicas of an older revision are replaced.
            for key, vp in plan.versions.items():
                mine = [r for r in rows.values() if (r.deployment, r.version) == key and r.state in ACTIVE_STATES
                        and r.id not in self._stopping]
                current = [r for r in mine if r.revision >= vp.revision]
                stale = [r for r in mine if r.revision < vp.revision]
                for _ in range(vp.desired - len(current)):
                    row = Replica(id=new_replica_id(), deployment=vp.deployment, version=vp.number,
                                  pool=self.backend.name, state="starting", started_at=now, restarts=0,
                                  failures=0, revision=vp.revision, data={})
                    s.add(row)
                    self._launch(s, row, vp)
                    current.append(row)
                excess = len(current) - vp.desired
                if excess > 0:
                    order = {"crashloop": 0, "starting": 1, "unready": 2, "ready": 3}
                    victims = sorted(current, key=lambda r: (order.get(r.state, 0), -aware(r.started_at).timestamp()))
                    for r in victims[:excess]:
                        self._mark_stopping(s, r, "scaled down")
                        to_stop.append((_row(r), True, True, vp.grace_s))
                ready_current = sum(r.state == "ready" for r in current)
                if stale and (ready_current >= max(vp.desired, 1) or vp.desired == 0):
                    for r in stale:
                        self._mark_stopping(s, r, "replaced by a newer revision")
                        to_stop.append((_row(r), True, True, vp.grace_s))

            # Crash-looping replicas whose backoff is over start again.
            for row in rows.values():
                if row.state == "crashloop" and row.pid is None and row.id not in self._stopping:
                    vp = plan.versions.get((row.deployment, row.version))
                    if vp and (row.next_start_at is None or aware(row.next_start_at) <= now):
                        self._launch(s, row, vp)
        return to_stop

    def _health(self, s: Any, row: Replica, vp: VersionPlan, probe: Probe | None, now: Any,
                to_stop: list[tuple[ReplicaRow, bool, bool, float]]) -> None:
        if row.state == "crashloop" or row.pid is None:
            return
        status = self.backend.inspect(_row(row).handle())
        if not status.alive:
            self._fail(s, row, vp, f"replica process {status.detail or 'exited'}", now, to_stop, kill=False)
            return
        mem = self._memory.setdefault(row.id, _Memory())
        if row.state == "starting":
            if probe is not None and probe.ready:
                row.state = "ready"
                row.ready_at = now
                row.failures = 0
                row.next_start_at = None
                started = aware(row.started_at)
                cold = (now - started).total_seconds() if started else None
                if self.metrics is not None and cold is not None:
                    self.metrics.cold_starts.labels(row.deployment, str(row.version)).inc()
                    self.metrics.cold_start_s.labels(row.deployment).observe(cold)
                s.execute(Version.__table__.update()
                          .where(Version.number == row.version,
                                 Version.deployment_id == select(Deployment.id)
                                 .where(Deployment.name == row.deployment).scalar_subquery())
                          .values(last_cold_start_s=cold))
                mem.last_live = time.monotonic()
                add_event(s, row.deployment, "replica_ready", f"replica {row.id} of version {row.version} is ready "
                          f"at {row.url}" + (f" after {cold:.1f}s" if cold is not None else ""),
                          replica=row.id, version=row.version)
                return
            if probe is not None and probe.load_failed:
                self._fail(s, row, vp, probe.reason, now, to_stop)
                return
            timeout = vp.health("startup_timeout_s", 900.0)
            started = aware(row.started_at)
            if started and (now - started).total_seconds() > timeout:
                self._fail(s, row, vp, f"not ready within startup_timeout_s={timeout:g}"
                           + (f" ({probe.reason})" if probe and probe.reason else ""), now, to_stop)
            return
        # ready / unready: liveness and readiness at the liveness period
        if probe is None:
            return
        if probe.live:
            mem.live_failures = 0
        else:
            mem.live_failures += 1
            threshold = int(vp.health("failure_threshold", 3))
            if mem.live_failures >= threshold:
                self._fail(s, row, vp, f"failed {mem.live_failures} liveness probes: {probe.reason}", now, to_stop)
                return
        if probe.ready and row.state == "unready":
            row.state = "ready"
            add_event(s, row.deployment, "replica_ready", f"replica {row.id} is ready again", replica=row.id,
                      version=row.version)
        elif probe.ready is False and row.state == "ready" and probe.live:
            row.state = "unready"
            add_event(s, row.deployment, "replica_unready", f"replica {row.id} is not ready: {probe.reason}",
                      replica=row.id, version=row.version)

    def _fail(self, s: Any, row: Replica, vp: VersionPlan, reason: str, now: Any,
              to_stop: list[tuple[ReplicaRow, bool, bool, float]], kill: bool = True) -> None:
        """Replace a replica that died, failed its probes or never became ready; back off when it repeats."""
        snap = _row(row)
        tail = self.backend.logs(snap.handle(), LOG_TAIL_ON_ERROR)
        row.last_error = reason + ("\nlast log lines:\n" + "\n".join(tail) if tail else "")
        row.restarts += 1
        row.failures += 1
        self._memory.pop(row.id, None)
        if kill:
            to_stop.append((snap, False, False, min(vp.grace_s, 5.0)))
        if row.failures >= 2:
            delay = min(self.settings.backoff_base_s * 2 ** (row.failures - 2), self.settings.backoff_max_s)
            row.state = "crashloop"
            row.pid = None
            row.url = None
            row.port = None
            row.next_start_at = now + timedelta(seconds=delay)
            add_event(s, row.deployment, "replica_crashloop", f"replica {row.id} of version {row.version} failed "
                      f"{row.failures} times in a row ({reason}); next start in {delay:g}s", replica=row.id,
                      version=row.version, error=reason, failures=row.failures)
        else:
            add_event(s, row.deployment, "replica_failed", f"replica {row.id} of version {row.version}: {reason}; "
                      "replacing it", replica=row.id, version=row.version, error=reason)
            self._launch(s, row, vp)

    def _launch(self, s: Any, row: Replica, vp: VersionPlan) -> None:
        spec = ReplicaSpec(replica_id=row.id, deployment=vp.deployment, version=vp.number,
                           package_path=Path(vp.package_path), resources=dict(vp.config.get("resources") or {}))
        try:
            h = self.backend.start(spec)
        except Exception as e:
            row.state = "crashloop"
            row.pid = None
            row.failures += 1
            row.last_error = f"could not start: {type(e).__name__}: {e}"
            delay = min(self.settings.backoff_base_s * 2 ** max(row.failures - 1, 0), self.settings.backoff_max_s)
            row.next_start_at = utcnow() + timedelta(seconds=delay)
            add_event(s, row.deployment, "replica_crashloop", row.last_error, replica=row.id, version=row.version)
            return
        row.state = "starting"
        row.pid, row.url, row.port, row.log_path, row.pool = h.pid, h.url, h.port, h.log_path, h.pool
        row.data = dict(h.data)
        row.started_at = utcnow()
        row.ready_at = None
        row.next_start_at = None
        row.revision = vp.revision
        self._memory.pop(row.id, None)
        add_event(s, row.deployment, "replica_started", f"replica {row.id} of version {row.version} starting on "
                  f"{h.pool} at {h.url} (pid {h.pid})", replica=row.id, version=row.version, pid=h.pid)

    def _mark_stopping(self, s: Any, row: Replica, why: str) -> None:
        row.state = "stopping"
        add_event(s, row.deployment, "replica_stopping", f"replica {row.id} of version {row.version}: {why}; "
                  "draining", replica=row.id, version=row.version)

    def _stop_task(self, snap: ReplicaRow, *, drain: bool, remove: bool, grace: float = 30.0) -> asyncio.Task[None]:
        async def run() -> None:
            try:
                if drain and snap.pid:
                    await asyncio.sleep(self.settings.drain_s)
                if snap.pid:
                    await asyncio.to_thread(self.backend.stop, snap.handle(), grace)
                if remove:
                    await asyncio.to_thread(self._remove, snap)
            except Exception:
                log.exception("stopping replica %s failed", snap.id)
            finally:
                if remove:
                    self._stopping.pop(snap.id, None)

        task = asyncio.get_running_loop().create_task(run())
        if remove:
            self._stopping[snap.id] = task
        return task

    def _remove(self, snap: ReplicaRow) -> None:
        with self.sessions() as s, s.begin():
            s.execute(delete(Replica).where(Replica.id == snap.id))
            add_event(s, snap.deployment, "replica_stopped", f"replica {snap.id} of version {snap.version} stopped",
                      replica=snap.id, version=snap.version)
        self._memory.pop(snap.id, None)


def _reason(r: httpx.Response) -> str:
    try:
        body = r.json()
        return str(body.get("reason") or body.get("status") or r.status_code)
    except ValueError:
        return f"HTTP {r.status_code}"


def _row(r: Replica) -> ReplicaRow:
    return ReplicaRow(r.id, r.deployment, r.version, r.state, r.pid, r.url, r.port, r.log_path, r.pool,
                      r.started_at, r.ready_at, r.restarts, r.failures, r.next_start_at, r.revision,
                      dict(r.data or {}))
