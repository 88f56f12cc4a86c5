"""Prometheus metrics of one replica, in a registry of its own (so several apps can share a process)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import Scope

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class RuntimeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ballast_requests", "Requests by route, method and status.", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "ballast_request_duration_seconds", "End-to-end request latency.", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttfb = Histogram(
            "ballast_time_to_first_byte_seconds", "Time until the first body byte is sent.", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge("ballast_requests_in_flight", "Requests running in the model.", registry=r)
        self.queued = Gauge("ballast_requests_queued", "Requests waiting for a free model slot.", registry=r)
        self.rejected = Counter(
            "ballast_requests_rejected", "Requests refused before running, by reason.", ["reason"], registry=r
        )
        self.ready = Gauge("ballast_model_ready", "1 when the model is loaded and healthy.", registry=r)
        self.load_seconds = Gauge("ballast_model_load_seconds", "How long load() took.", registry=r)


class RequestMetrics:
    """The request-id middleware's observer: requests by route/method/status, latency and time to first byte.

    Label children are looked up once per route (and status) and cached: `labels()` costs more than the
    observation itself on the hot path.
    """

    def __init__(self, metrics: RuntimeMetrics, known_routes: set[str]):
        self.metrics = metrics
        self.known_routes = frozenset(known_routes)
        self._children: dict[str, tuple[Any, Any]] = {}
        self._counters: dict[tuple[str, str, int], Any] = {}

    def start(self, scope: Scope) -> _Observed:
        path = scope["path"]
        route = path if path in self.known_routes else "other"
        children = self._children.get(route)
        if children is None:
            children = self._children[route] = (self.metrics.ttfb.labels(route), self.metrics.latency.labels(route))
        return _Observed(self, route, scope["method"], children)

    def count(self, route: str, method: str, status: int) -> None:
        key = (route, method, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.metrics.requests.labels(route, method, str(status))
        counter.inc()


class _Observed:
    __slots__ = ("latency", "method", "owner", "route", "start", "ttfb")

    def __init__(self, owner: RequestMetrics, route: str, method: str, children: tuple[Any, Any]):
        self.owner = owner
        self.route = route
        self.method = method
        self.ttfb, self.latency = children
        self.start = time.perf_counter()

    def first_byte(self) -> None:
        self.ttfb.observe(time.perf_counter() - self.start)

    def done(self, status: int) -> None:
        self.owner.count(self.route, self.method, status)
        self.latency.observe(time.perf_counter() - self.start)
