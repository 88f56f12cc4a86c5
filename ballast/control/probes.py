"""Health probes over HTTP: readiness of starting replicas every tick, liveness (then readiness) of
running ones every `health.liveness_period_s`.

Probes run as their own tasks, so a replica that hangs (its probes time out) never slows the
reconciliation of the others; an answer about a process that was replaced meanwhile is dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from ballast.control.actuator import ReplicaRow
from ballast.control.health import Probe, ReplicaState

PROBED = (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.UNREADY)


class Prober:
    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None
        self._inflight: dict[str, tuple[str, asyncio.Task[Probe]]] = {}
        self._last_live: dict[str, float] = {}

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(2.0, connect=1.0), trust_env=False)

    async def close(self) -> None:
        for _url, task in self._inflight.values():
            task.cancel()
        if self._client is not None:
            await self._client.aclose()

    def forget(self, replica_id: str) -> None:
        """A new process for this replica: probe it from scratch."""
        self._last_live.pop(replica_id, None)

    def probed_now(self, replica_id: str) -> None:
        """It just became ready: next liveness probe one period from now."""
        self._last_live[replica_id] = time.monotonic()

    async def collect(self, rows: list[ReplicaRow], period_s: Callable[[ReplicaRow], float]) -> dict[str, Probe]:
        """Start due probes, wait briefly for them (healthy replicas answer in milliseconds), and return
        every finished answer that is still about the current process."""
        started = self._start_due(rows, period_s)
        if started:
            await asyncio.wait(started, timeout=0.25)
        urls = {r.id: r.url for r in rows}
        results: dict[str, Probe] = {}
        for rid, (url, task) in list(self._inflight.items()):
            if not task.done():
                continue
            del self._inflight[rid]
            if urls.get(rid) != url:
                continue
            try:
                results[rid] = task.result()
            except Exception as e:
                results[rid] = Probe(ready=False, live=False, reason=f"probe failed: {type(e).__name__}")
        for rid in set(self._last_live) - set(urls):
            del self._last_live[rid]
        return results

    def _start_due(self, rows: list[ReplicaRow], period_s: Callable[[ReplicaRow], float]) -> list[asyncio.Task[Probe]]:
        """Starting replicas every tick; running ones once per liveness period."""
        now = time.monotonic()
        started: list[asyncio.Task[Probe]] = []
        for r in rows:
            if not r.url or not r.pid or r.state not in PROBED or r.id in self._inflight:
                continue
            if r.state != ReplicaState.STARTING:
                if now - self._last_live.get(r.id, 0.0) < period_s(r):
                    continue
                self._last_live[r.id] = now
            task = asyncio.create_task(self._probe(r.url))
            self._inflight[r.id] = (r.url, task)
            started.append(task)
        return started

    async def _probe(self, url: str) -> Probe:
        """Liveness first (a load failure or a hang shows there), then readiness."""
        assert self._client is not None
        p = Probe()
        try:
            r = await self._client.get(url + "/health/live")
        except httpx.HTTPError as e:
            return Probe(ready=False, live=False, reason=f"liveness probe failed: {type(e).__name__}")
        p.live = r.status_code == 200
        if not p.live:
            p.reason = _reason(r)
            return Probe(ready=False, live=False, reason=p.reason, load_failed="load failed" in p.reason)
        try:
            r = await self._client.get(url + "/health/ready")
            p.ready = r.status_code == 200
            if not p.ready:
                p.reason = _reason(r)
        except httpx.HTTPError as e:
            p.ready = False
            p.reason = f"readiness probe failed: {type(e).__name__}"
        return p


def _reason(r: httpx.Response) -> str:
    try:
        body = r.json()
        return str(body.get("reason") or body.get("status") or r.status_code)
    except ValueError:
        return f"HTTP {r.status_code}"
