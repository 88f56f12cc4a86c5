"""The gateway's Prometheus metrics (served on the platform's `/metrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    """Requests, latency, tokens, held requests, retries and ejections, by deployment."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.requests = Counter("ballast_gateway_requests", "Requests by deployment, version and status.",
                                ["deployment", "version", "status"], registry=r)
        self.latency = Histogram("ballast_gateway_request_duration_seconds", "End-to-end latency through the gateway.",
                                 ["deployment"], registry=r,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                                          60, 120))
        self.ttft = Histogram("ballast_gateway_time_to_first_token_seconds", "Streams: time to the first chunk "
                              "from the replica.", ["deployment"], registry=r,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("ballast_gateway_inter_token_latency_seconds", "Streams: mean time between output tokens "
                             "of each request.", ["deployment"], registry=r,
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.tokens = Counter("ballast_gateway_tokens", "Tokens through the gateway by kind (rate() gives tokens/s).",
                              ["deployment", "kind"], registry=r)
        self.queued = Gauge("ballast_gateway_queue_depth", "Requests held waiting for a replica.", ["deployment"],
                            registry=r)
        self.retries = Counter("ballast_gateway_retries", "Requests retried on another replica.", ["deployment"],
                               registry=r)
        self.ejections = Counter("ballast_gateway_ejections", "Replicas ejected after failures.", ["deployment"],
                                 registry=r)
        self.stream_resumed = Counter("ballast_gateway_stream_resumed", "Streams continued on another replica after "
                                      "the one serving them died mid-answer.", ["deployment"], registry=r)
        self.cold_waits = Histogram("ballast_gateway_cold_start_wait_seconds", "Time requests were held for a "
                                    "replica to start.", ["deployment"], registry=r,
                                    buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300))
