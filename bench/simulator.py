"""Capacity simulator: pools, one deployment and a traffic trace in virtual time, with Ballast's own control code.

`python bench/simulator.py [--pools pools.yaml] [--trace diurnal|bursty] [--duration S] [--rps R]`

Imported, not copied: the autoscaler (`control.autoscaler.Autoscaler` on a virtual clock, fed the in-flight
count a gateway would publish), placement (`control.placement.Placement`: spread over usable pools, capacity),
the failover decision (`control.failover.failing_pools`) and its backoff (`control.pools.retry_after_s`).
Simulated: replica cold starts per pool, one request per replica slot at a time (FIFO through the least busy
slot, as least-outstanding routing does), pool outages from the pools file (a lost replica's in-flight
requests are retried elsewhere, as the gateway retries non-streamed requests), and requests that wait longer
than `max_wait_s` with no replica failing. Reports replicas over time, queueing, retries and failures.

Pools file (YAML): `pools: [{name, max_replicas, cold_start_s, outages: [[down_at_s, up_at_s], ...]}]` and
`deployment: {service_s, concurrency, autoscaling: {...ballast.yaml autoscaling...}, max_wait_s}`.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ballast.config import BallastConfig
from ballast.control.actuator import ReplicaRow
from ballast.control.autoscaler import Autoscaler, Policy
from ballast.control.failover import failing_pools
from ballast.control.placement import Placement, PoolInfo
from ballast.control.pools import retry_after_s

TICK_S = 0.5  # the reconcile interval
KEY = ("svc", 1)
DEFAULT = {
    "pools": [{"name": "local", "max_replicas": 6, "cold_start_s": 3.0},
              {"name": "spot", "max_replicas": 6, "cold_start_s": 8.0, "outages": [[240, 330]]}],
    "deployment": {"service_s": 0.2, "concurrency": 2, "max_wait_s": 30.0,
                   "autoscaling": {"min_replicas": 2, "max_replicas": 10, "concurrency_target": 2,
                                   "window_s": 20, "scale_down_delay_s": 60}},
}


def trace(kind: str, duration: float, rps: float, seed: int = 0) -> list[float]:
    """Arrival times: a diurnal wave (one period over the run), or quiet traffic with bursts of 4x."""
    rng, t, out = random.Random(seed), 0.0, []
    while t < duration:
        if kind == "diurnal":
            rate = rps * (0.55 + 0.45 * math.sin(2 * math.pi * t / duration - math.pi / 2))
        else:
            rate = rps * (4.0 if int(t / 30) % 5 == 2 else 0.5)
        t += rng.expovariate(max(rate, 1e-3))
        out.append(t)
    return out


@dataclass
class Replica:
    id: str
    pool: str
    ready_at: float
    slots: list[float]  # when each slot is free
    work: list[tuple[float, float]] = field(default_factory=list)  # (arrival, finish) of requests given to it


class Sim:
    def __init__(self, spec: dict[str, Any]):
        self.pools = [PoolInfo(p["name"], max_replicas=p.get("max_replicas"), default=i == 0)
                      for i, p in enumerate(spec["pools"])]
        self.pool_spec = {p["name"]: p for p in spec["pools"]}
        dep = spec["deployment"]
        self.service_s, self.concurrency, self.max_wait_s = dep["service_s"], dep["concurrency"], dep["max_wait_s"]
        self.config = BallastConfig.model_validate({"name": "svc", "autoscaling": dep["autoscaling"]})
        a = self.config.autoscaling
        self.policy = Policy.from_config(a, a.min_replicas, a.max_replicas)
        self.now = 0.0
        self.autoscaler = Autoscaler(signal=self, clock=lambda: self.now)
        self.replicas: dict[str, Replica] = {}
        self.desired = self.policy.min_replicas
        self.retry_at: dict[str, float] = {}
        self.failures: dict[str, int] = {}
        self.finishes: list[float] = []
        self.held: deque[float] = deque()
        self.waits: list[float] = []
        self.failed = self.retried = self.cold_starts = 0
        self.replica_seconds = 0.0
        self.timeline: list[dict[str, Any]] = []
        self._n = 0

    def load(self) -> dict[tuple[str, int], float]:
        """The gateway's signal: requests in flight or held."""
        while self.finishes and self.finishes[0] <= self.now:
            heapq.heappop(self.finishes)
        return {KEY: float(len(self.finishes) + len(self.held))}

    def _outage(self, pool: str) -> bool:
        return any(a <= self.now < b for a, b in self.pool_spec[pool].get("outages", []))

    def _failover(self) -> None:
        checks = {p.name: "its cluster does not answer" if self._outage(p.name) else None for p in self.pools}
        rows = [ReplicaRow(r.id, "svc", 1, "ready", 1, None, None, None, r.pool, None, 0, {})
                for r in self.replicas.values() if r.ready_at <= self.now]
        usable = {p.name for p in self.pools if p.usable}
        for name in failing_pools(rows, {}, checks, {}, usable):
            pool = next(p for p in self.pools if p.name == name)
            pool.healthy = False
            self.failures[name] = self.failures.get(name, 0) + 1
            self.retry_at[name] = self.now + retry_after_s(self.failures[name])
            for r in [r for r in self.replicas.values() if r.pool == name]:
                self._lose(r)
        for p in self.pools:
            if not p.healthy and self.now >= self.retry_at[p.name] and not checks[p.name]:
                p.healthy = True

    def _lose(self, r: Replica) -> None:
        """A replica of a lost pool: what it was serving is retried elsewhere (arrival time kept)."""
        del self.replicas[r.id]
        again = sorted(a for a, f in r.work if f > self.now)
        self.retried += len(again)
        self.held.extendleft(reversed(again))

    def _scale(self) -> None:
        self.desired = self.autoscaler.desired(KEY, self.policy, self.desired)
        placement = Placement.of(self.pools, [("svc", 1, r.pool) for r in self.replicas.values()])
        while len(self.replicas) < self.desired:
            pool = placement.choose("svc", 1, self.config)
            if pool is None:
                break
            self._n += 1
            ready = self.now + float(self.pool_spec[pool].get("cold_start_s", 1.0))
            self.replicas[f"r{self._n}"] = Replica(f"r{self._n}", pool, ready, [ready] * self.concurrency)
            self.cold_starts += 1
        extra = sorted(self.replicas.values(), key=lambda r: -r.ready_at)[: max(0, len(self.replicas) - self.desired)]
        for r in extra:  # newest first; drained: what it serves finishes
            del self.replicas[r.id]

    def _serve(self, arrival: float) -> bool:
        slots = [(free, i, r) for r in self.replicas.values() if r.ready_at <= self.now
                 for i, free in enumerate(r.slots)]
        if not slots:
            return False
        free, i, r = min(slots, key=lambda s: s[0])
        start = max(free, arrival, self.now if arrival < self.now else arrival)
        finish = start + self.service_s
        r.slots[i] = finish
        r.work = [w for w in r.work if w[1] > self.now] + [(arrival, finish)]
        heapq.heappush(self.finishes, finish)
        self.waits.append(start - arrival)
        return True

    def run(self, arrivals: list[float], duration: float) -> None:
        i = 0
        while self.now < duration:
            self.autoscaler.observe()
            self._failover()
            self._scale()
            end = self.now + TICK_S
            while i < len(arrivals) and arrivals[i] < end:
                self.held.append(arrivals[i])
                i += 1
            kept: deque[float] = deque()
            while self.held:
                a = self.held.popleft()
                if self.now - a > self.max_wait_s:
                    self.failed += 1
                elif not self._serve(a):
                    kept.append(a)
            self.held = kept
            self.replica_seconds += TICK_S * len(self.replicas)
            if int(self.now / TICK_S) % int(10 / TICK_S) == 0:
                self.timeline.append(self._sample())
            self.now = end

    def _sample(self) -> dict[str, Any]:
        per_pool = {p.name: sum(r.pool == p.name and r.ready_at <= self.now for r in self.replicas.values())
                    for p in self.pools}
        return {"t": round(self.now), "desired": self.desired, "ready": per_pool, "held": len(self.held),
                "in_flight": len(self.finishes), "down": [p.name for p in self.pools if not p.healthy]}


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values[0] if values else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", type=Path, help="pools and deployment (YAML); default: two pools, one with an outage")
    ap.add_argument("--trace", choices=["diurnal", "bursty"], default="bursty")
    ap.add_argument("--duration", type=float, default=600.0, help="simulated seconds")
    ap.add_argument("--rps", type=float, default=20.0, help="mean arrival rate at the peak of the trace")
    ap.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = ap.parse_args()
    spec = yaml.safe_load(args.pools.read_text()) if args.pools else DEFAULT
    arrivals = trace(args.trace, args.duration, args.rps)
    sim = Sim(spec)
    sim.run(arrivals, args.duration)
    result = {"requests": len(arrivals), "served": len(arrivals) - sim.failed - len(sim.held), "failed": sim.failed,
              "retried": sim.retried,
              "wait_p50_s": round(_pct(sim.waits, 50), 3), "wait_p99_s": round(_pct(sim.waits, 99), 3),
              "cold_starts": sim.cold_starts, "replica_hours": round(sim.replica_seconds / 3600, 3),
              "timeline": sim.timeline}
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        return
    for s in sim.timeline:
        ready = " ".join(f"{k}={v}" for k, v in s["ready"].items())
        down = f" down: {','.join(s['down'])}" if s["down"] else ""
        print(f"t={s['t']:>5}s desired={s['desired']:>2} ready {ready} held={s['held']} "
              f"in_flight={s['in_flight']}{down}")
    print({k: v for k, v in result.items() if k != "timeline"})


if __name__ == "__main__":
    main()
