"""The platform's metrics history in its own store: windows of counter and histogram deltas turned into points
(rates, percentiles, gauge means), written as one row per deployment and bucket, pruned to a fixed horizon.

Two resolutions: the sampling interval (10 s) kept a day, and 5 minutes kept 30 days. A 5-minute point is built
from the summed deltas of its window (not averaged percentiles), so its p99 is the p99 of those 5 minutes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from ballast.control.errors import ControlError
from ballast.control.times import aware
from ballast.store import Deployment, MetricPoint, Replica, Version

COARSE_S = 300
FINE_KEEP_S = 86_400
COARSE_KEEP_S = 30 * 86_400
QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
HISTOGRAMS = ("latency", "ttft", "itl")
COUNTERS = ("requests_2xx", "requests_4xx", "requests_5xx", "tokens_in", "tokens_out")
GAUGES = ("replicas_desired", "replicas_ready", "replicas_starting", "queue_depth", "kv_cache_usage")

# Series name -> unit, in the order the dashboard draws them.
SERIES: dict[str, str] = {
    "requests_2xx": "req/s", "requests_4xx": "req/s", "requests_5xx": "req/s", "error_rate": "fraction",
    **{f"{h}_{q}": "s" for h in HISTOGRAMS for q, _ in QUANTILES},
    "tokens_in": "tokens/s", "tokens_out": "tokens/s",
    "replicas_desired": "replicas", "replicas_ready": "replicas", "replicas_starting": "replicas",
    "queue_depth": "requests", "kv_cache_usage": "fraction", "prefix_cache_hit_rate": "fraction",
    "cold_starts": "starts",
}
RANGES = {"15m": 900, "1h": 3600, "24h": 86_400, "7d": 7 * 86_400}

Buckets = dict[float, float]  # upper bound (le) -> count in the window (not cumulative)


def quantile(q: float, buckets: Buckets) -> float | None:
    """Prometheus' histogram_quantile over one window's bucket counts: linear within the bucket holding the
    rank; the highest finite bound when the rank falls in +Inf; None without observations."""
    bounds = sorted(buckets)
    total = sum(buckets.values())
    if total <= 0:
        return None
    rank, seen, lower = q * total, 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if seen + count >= rank and count > 0:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - seen) / count
        seen += count
        if not math.isinf(le):
            lower = le
    return lower


@dataclass
class Window:
    """What happened to one deployment over a stretch of time: summed deltas and gauge samples."""

    seconds: float = 0.0
    counters: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Buckets] = field(default_factory=dict)
    gauges: dict[str, list[float]] = field(default_factory=dict)
    prefix: list[float] = field(default_factory=lambda: [0.0, 0.0])  # hits, queries
    cold_starts: int = 0

    def add(self, other: Window) -> None:
        self.seconds += other.seconds
        for k, v in other.counters.items():
            self.counters[k] = self.counters.get(k, 0.0) + v
        for name, b in other.histograms.items():
            mine = self.histograms.setdefault(name, {})
            for le, n in b.items():
                mine[le] = mine.get(le, 0.0) + n
        for k, vs in other.gauges.items():
            self.gauges.setdefault(k, []).extend(vs)
        self.prefix = [self.prefix[0] + other.prefix[0], self.prefix[1] + other.prefix[1]]
        self.cold_starts += other.cold_starts

    def values(self) -> dict[str, float | None]:
        """The window as one point of every series (None where nothing was measured)."""
        out: dict[str, float | None] = dict.fromkeys(SERIES)
        span = self.seconds or 1.0
        for k in COUNTERS:
            out[k] = round(self.counters.get(k, 0.0) / span, 4)
        total = sum(self.counters.get(k, 0.0) for k in COUNTERS[:3])
        out["error_rate"] = round(self.counters.get("requests_5xx", 0.0) / total, 4) if total else None
        for h in HISTOGRAMS:
            for name, q in QUANTILES:
                v = quantile(q, self.histograms.get(h, {}))
                out[f"{h}_{name}"] = round(v, 6) if v is not None else None
        for k in GAUGES:
            vs = self.gauges.get(k)
            out[k] = round(sum(vs) / len(vs), 4) if vs else None
        out["prefix_cache_hit_rate"] = round(self.prefix[0] / self.prefix[1], 4) if self.prefix[1] else None
        out["cold_starts"] = float(self.cold_starts)
        return out


class MetricsHistory:
    """Rows of `metric_points`: written by the sampler, read by the REST API and the dashboard."""

    def __init__(self, sessions: sessionmaker[Session], fine_s: int = 10):
        self.sessions = sessions
        self.fine_s = fine_s

    def write(self, resolution: int, ts: int, points: dict[str, dict[str, float | None]]) -> None:
        """Upsert one bucket of every deployment (a bucket written again is replaced: rollups grow in place)."""
        if not points:
            return
        rows = [{"deployment": d, "resolution": resolution, "ts": ts, "values": v} for d, v in points.items()]
        with self.sessions() as s, s.begin():
            dialect = s.get_bind().dialect.name
            if dialect not in ("postgresql", "sqlite"):  # pragma: no cover - other databases
                for r in rows:
                    s.merge(MetricPoint(**r))
                return
            ins: Any = postgresql.insert(MetricPoint) if dialect == "postgresql" else sqlite.insert(MetricPoint)
            stmt = ins.values(rows)
            s.execute(stmt.on_conflict_do_update(index_elements=["deployment", "resolution", "ts"],
                                                 set_={"values": stmt.excluded["values"]}))

    def prune(self, now: float, deployments: Iterable[str], orphans: bool = False) -> None:
        """Drop what is past its horizon, deployment by deployment (along the primary key, never a table scan), and
        with `orphans` the rows of deleted deployments: the table stays deployments x buckets rows."""
        with self.sessions() as s, s.begin():
            for d in deployments:
                for resolution, keep in ((self.fine_s, FINE_KEEP_S), (COARSE_S, COARSE_KEEP_S)):
                    s.execute(delete(MetricPoint).where(MetricPoint.deployment == d,
                                                        MetricPoint.resolution == resolution,
                                                        MetricPoint.ts < int(now) - keep))
            if orphans:
                s.execute(delete(MetricPoint).where(MetricPoint.deployment.not_in(select(Deployment.name))))

    def query(self, deployment: str, range_: str, now: float) -> dict[str, Any]:
        """Columnar series for a chart: `t` (bucket starts, Unix s) and one list per series, oldest first."""
        span = RANGES.get(range_)
        if span is None:
            raise ControlError(400, f"range must be one of {', '.join(RANGES)}", "invalid_range", "range")
        # A day of 10 s points is 8,640 per series, more than a chart is wide: 24h and 7d read the 5-minute points.
        resolution = COARSE_S if span >= FINE_KEEP_S else self.fine_s
        with self.sessions() as s:
            if s.scalar(select(Deployment.id).where(Deployment.name == deployment)) is None:
                raise ControlError(404, f"no deployment named {deployment!r}", "deployment_not_found", "name")
            rows = s.execute(select(MetricPoint.ts, MetricPoint.values)
                             .where(MetricPoint.deployment == deployment, MetricPoint.resolution == resolution,
                                    MetricPoint.ts >= int(now) - span).order_by(MetricPoint.ts)).all()
        return {"deployment": deployment, "range": range_, "resolution_s": resolution, "units": SERIES,
                "t": [ts for ts, _ in rows],
                "series": {name: [v.get(name) for _, v in rows] for name in SERIES}}

    def rows(self) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(MetricPoint)) or 0)

    def replica_gauges(self, since: datetime) -> dict[str, dict[str, float]]:
        """Per deployment: replicas desired (summed over versions), ready, starting, and how many became ready
        after `since` (cold starts)."""
        with self.sessions() as s:
            desired = dict(s.execute(select(Deployment.name, func.sum(Version.desired))
                                     .join(Version, Version.deployment_id == Deployment.id)
                                     .group_by(Deployment.name)).all())
            names = list(s.scalars(select(Deployment.name)).all())
            replicas = s.execute(select(Replica.deployment, Replica.state, Replica.ready_at)).all()
        out = {n: {"replicas_desired": float(desired.get(n) or 0), "replicas_ready": 0.0, "replicas_starting": 0.0,
                   "cold_starts": 0.0} for n in names}
        for dep, state, ready_at in replicas:
            g = out.get(dep)
            if g is None:
                continue
            if state == "ready":
                g["replicas_ready"] += 1
            elif state in ("pending", "starting"):
                g["replicas_starting"] += 1
            ready = aware(ready_at)
            if ready is not None and ready > since:
                g["cold_starts"] += 1
        return out
