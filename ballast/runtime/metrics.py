"""Prometheus metrics of one replica, in a registry of its own (so several apps can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
