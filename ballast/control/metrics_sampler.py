"""Samples the platform every interval (10 s) into the metrics history: the gateway's Prometheus counters and
histograms (read from its registry in this process), every ready replica's `/metrics` (KV-cache use, prefix-cache
hits), and replica counts from the store. Its cost depends on deployments and replicas, never on the request rate:
nothing is recorded per request beyond the counters Prometheus keeps anyway.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from ballast.control.metrics_history import COARSE_S, MetricsHistory, Window
from ballast.observe.replica_auth import headers_for

log = logging.getLogger("ballast.metrics")

_HISTOGRAMS = {"ballast_gateway_request_duration_seconds": "latency",
               "ballast_gateway_time_to_first_token_seconds": "ttft",
               "ballast_gateway_inter_token_latency_seconds": "itl"}
_REPLICA = {"ballast_llm_kv_cache_usage": "kv", "ballast_llm_prefix_cache_hits": "hits",
            "ballast_llm_prefix_cache_queries": "queries"}
T = TypeVar("T")
Targets = Callable[[], list[tuple[str, str, str]]]  # (deployment, replica id, url) of every ready replica


def interval_from_env() -> int:
    """Seconds between samples (BALLAST_METRICS_INTERVAL_S, default 10); 0 turns the metrics history off."""
    try:
        return max(0, int(os.environ.get("BALLAST_METRICS_INTERVAL_S", "10")))
    except ValueError:
        return 10


def _status_class(status: str) -> str:
    return "requests_5xx" if status >= "500" or not status.isdigit() else (
        "requests_4xx" if status >= "400" else "requests_2xx")


def read_gateway(registry: CollectorRegistry) -> dict[tuple[str, str, float], float]:
    """The gateway's cumulative counters as {(deployment, name, le): value} (le is nan except for buckets)."""
    out: dict[tuple[str, str, float], float] = {}
    nan = math.nan
    for family in registry.collect():
        for s in family.samples:
            dep = s.labels.get("deployment")
            if dep is None:
                continue
            if s.name == "ballast_gateway_requests_total":
                key = (dep, _status_class(s.labels.get("status", "")), nan)
            elif s.name == "ballast_gateway_tokens_total":
                key = (dep, "tokens_in" if s.labels.get("kind") == "prompt" else "tokens_out", nan)
            elif s.name.endswith("_bucket") and s.name[:-7] in _HISTOGRAMS:
                key = (dep, _HISTOGRAMS[s.name[:-7]], float(s.labels["le"]))
            elif s.name == "ballast_gateway_queue_depth":
                key = (dep, "queue_depth", nan)
            else:
                continue
            out[key] = out.get(key, 0.0) + s.value
    return out


def parse_replica(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        name = _REPLICA.get(family.name)
        if name is not None and family.samples:
            out[name] = family.samples[0].value
    return out


class Sampler:
    """The sampling loop (a gateway companion: started and stopped with it)."""

    def __init__(self, history: MetricsHistory, registry: CollectorRegistry, targets: Targets,
                 interval_s: int | None = None):
        self.history = history
        self.registry = registry
        self.targets = targets
        self.interval_s = interval_s or history.fine_s
        self._last: dict[Any, float] = {}
        self._coarse: dict[str, Window] = {}
        self._coarse_ts = -1
        self._last_t = time.time()
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self.cpu = Counter("ballast_metrics_history_cpu_seconds", "CPU time the metrics-history sampler spent "
                           "(its own synchronous work; HTTP scrapes of replicas not included).", registry=registry)
        self.samples = Counter("ballast_metrics_history_samples", "Samples taken into the metrics history.",
                               registry=registry)

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(2.0, connect=1.0), trust_env=False)
        self._last_t = time.time()
        self._delta_gateway(read_gateway(self.registry))  # the baseline
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._client is not None:
            await self._client.aclose()

    async def _loop(self) -> None:
        next_t = time.monotonic()
        while True:
            next_t += self.interval_s
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            try:
                await self.sample()
            except Exception:
                log.exception("sampling metrics failed; the next interval tries again")

    async def sample(self) -> None:
        """One interval: read everything, write the fine point and grow the 5-minute one. The CPU time of its own
        synchronous work (reading, parsing, computing, the store) goes to `ballast_metrics_history_cpu_seconds`."""
        t0 = time.thread_time()
        now = time.time()
        since = datetime.fromtimestamp(self._last_t, UTC)
        self._last_t = now
        seconds = float(self.interval_s)  # nominal: the loop keeps a fixed cadence, so rate x width = count
        gateway = self._delta_gateway(read_gateway(self.registry))
        cpu = time.thread_time() - t0
        replicas, parse_cpu = await self._scrape()
        counts, store_cpu = await asyncio.to_thread(_timed, self.history.replica_gauges, since)
        t1 = time.thread_time()
        windows = {dep: self._window(dep, seconds, gateway, replicas.get(dep, []), g) for dep, g in counts.items()}
        fine_ts = int(now // self.interval_s) * self.interval_s
        coarse_ts = int(now // COARSE_S) * COARSE_S
        new_bucket = coarse_ts != self._coarse_ts
        if new_bucket:
            self._coarse, self._coarse_ts = {}, coarse_ts
        for dep, w in windows.items():
            self._coarse.setdefault(dep, Window()).add(w)
        fine = {dep: w.values() for dep, w in windows.items()}
        coarse = {dep: self._coarse[dep].values() for dep in windows}
        cpu += time.thread_time() - t1
        _, write_cpu = await asyncio.to_thread(_timed, self._write, fine_ts, fine, coarse_ts, coarse, new_bucket)
        self.cpu.inc(cpu + parse_cpu + store_cpu + write_cpu)
        self.samples.inc()

    def _write(self, fine_ts: int, fine: dict[str, Any], coarse_ts: int, coarse: dict[str, Any],
               new_bucket: bool) -> None:
        self.history.write(self.interval_s, fine_ts, fine)
        self.history.write(COARSE_S, coarse_ts, coarse)
        self.history.prune(fine_ts, fine, orphans=new_bucket)  # deleted deployments: every 5 minutes

    def _delta(self, key: Any, value: float) -> float:
        """The increase of a cumulative value since the last sample (a reset counts from zero)."""
        prev = self._last.get(key, 0.0)
        self._last[key] = value
        return value - prev if value >= prev else value

    def _delta_gateway(self, cum: dict[tuple[str, str, float], float]) -> dict[tuple[str, str, float], float]:
        """Counter and bucket deltas; gauges (queue depth) as they are."""
        return {k: (v if k[1] == "queue_depth" else self._delta(k, v)) for k, v in cum.items()}

    def _window(self, dep: str, seconds: float, gateway: dict[tuple[str, str, float], float],
                replicas: list[tuple[str, dict[str, float]]], gauges: dict[str, float]) -> Window:
        w = Window(seconds=seconds, cold_starts=int(gauges.get("cold_starts", 0)))
        w.gauges["queue_depth"] = [0.0]  # the gauge exists once a request was held
        cumulative: dict[str, dict[float, float]] = {}
        for (d, name, le), v in gateway.items():
            if d != dep:
                continue
            if name == "queue_depth":
                w.gauges["queue_depth"] = [v]
            elif math.isnan(le):
                w.counters[name] = w.counters.get(name, 0.0) + v
            else:
                cumulative.setdefault(name, {})[le] = v
        w.histograms = {name: _per_bucket(c) for name, c in cumulative.items()}
        for k in ("replicas_desired", "replicas_ready", "replicas_starting"):
            w.gauges[k] = [gauges.get(k, 0.0)]
        kv = [m["kv"] for _, m in replicas if "kv" in m]
        if kv:
            w.gauges["kv_cache_usage"] = [sum(kv) / len(kv)]
        for rid, m in replicas:
            if "hits" in m and "queries" in m:
                seen = ("r", rid, "queries") in self._last
                hits, queries = self._delta(("r", rid, "hits"), m["hits"]), self._delta(("r", rid, "queries"),
                                                                                         m["queries"])
                if seen:  # a replica's first sample is only its baseline
                    w.prefix = [w.prefix[0] + hits, w.prefix[1] + queries]
        return w

    async def _scrape(self) -> tuple[dict[str, list[tuple[str, dict[str, float]]]], float]:
        """Each ready replica's metrics, concurrently (a replica that does not answer in time is left out), and
        the CPU time spent parsing them."""
        assert self._client is not None
        client = self._client
        targets = self.targets()
        cpu = [0.0]

        async def one(rid: str, url: str) -> dict[str, float]:
            try:
                r = await client.get(url.rstrip("/") + "/metrics", headers=headers_for(rid))
                t = time.thread_time()
                out = parse_replica(r.text) if r.status_code == 200 else {}
                cpu[0] += time.thread_time() - t
                return out
            except (httpx.HTTPError, ValueError):
                return {}

        results = await asyncio.gather(*(one(rid, url) for _, rid, url in targets))
        out: dict[str, list[tuple[str, dict[str, float]]]] = {}
        for (dep, rid, _url), m in zip(targets, results, strict=True):
            out.setdefault(dep, []).append((rid, m))
        return out, cpu[0]


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """`fn(*args)` and the CPU time it took on this thread."""
    t = time.thread_time()
    out = fn(*args)
    return out, time.thread_time() - t


def _per_bucket(cumulative: dict[float, float]) -> dict[float, float]:
    """Cumulative bucket deltas (le -> observations <= le) to counts per bucket."""
    out: dict[float, float] = {}
    below = 0.0
    for le in sorted(cumulative):
        out[le] = max(0.0, cumulative[le] - below)
        below = cumulative[le]
    return out
