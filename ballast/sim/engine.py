"""One simulated deployment in virtual time: requests against replicas in pools, with Ballast's control code.

Imported, not copied: each reconcile tick feeds the real `control.autoscaler.Autoscaler` (on the virtual clock)
the in-flight plus held requests a gateway would publish; the pool failover decision is
`control.failover.failing_pools` with its backoff `control.pools.retry_after_s`; every new replica's pool, the
replicas stopped first on a scale-down and the one-at-a-time moves back after a recovery come from
`control.placement.Placement` with the policy's `placement:` block.

Simulated: a replica serves `concurrency` requests at once; TTFT is the wait for a free slot plus prefill (less
a shared prefix the replica has seen); a held request is routed FIFO to the first free slot (what least
outstanding routing converges to); a request held longer than `max_wait_s` is lost (the gateway's 503). A pool
outage kills its replicas at the first tick inside it; what they were serving is retried elsewhere (the gateway
retries, and resumes streams), lost only if it then waits too long. Events are a heap of slot free times: no
object per request, so a million requests run in seconds.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import Counter, deque
from typing import Any

from ballast.control.autoscaler import Autoscaler, Policy
from ballast.control.failover import failing_pools
from ballast.control.placement import Placement, PoolInfo
from ballast.control.pools import retry_after_s
from ballast.sim.policies import SimPolicy, make_policy
from ballast.sim.spec import SimSpec
from ballast.sim.traces import Trace

KEY = ("sim", 1)
NAN = float("nan")


class Simulation:
    def __init__(self, spec: SimSpec, policy: str | SimPolicy, slo_ttft_ms: float = 1000.0,
                 seed: int | None = None):
        self.spec, dep = spec, spec.deployment
        self.slo_s = slo_ttft_ms / 1000.0
        self.policy = policy if isinstance(policy, SimPolicy) else make_policy(policy, spec)
        self.rng = random.Random(spec.seed if seed is None else seed)
        self.infos = [PoolInfo(p.name, region=p.region, cloud=p.cloud, cost_per_hour=p.cost_per_hour,
                               max_replicas=p.max_replicas, default=p.default) for p in spec.pools]
        self.pools = {p.name: p for p in spec.pools}
        a = self.policy.config.autoscaling
        self.scaling = Policy.from_config(a, a.min_replicas, a.max_replicas)
        self.now = 0.0
        self.autoscaler = Autoscaler(signal=self, clock=lambda: self.now)
        self.autoscaler._max_window = self.scaling.window_s + 2 * dep.tick_s  # keep only what the policy reads
        self.desired = self.scaling.min_replicas
        self.concurrency, self.tick_s, self.max_wait = dep.concurrency, dep.tick_s, dep.max_wait_s
        self.inv_prefill, self.tpot = 1.0 / dep.prefill_tokens_per_s, dep.decode_s_per_token
        # Replicas, by id: pool, alive, ready time, prefixes seen. Pools: ids of their live replicas, oldest first.
        self.r_pool: list[str] = []
        self.alive: list[bool] = []
        self.ready_at: list[float] = []
        self.cache: list[set[int]] = []
        self.members: dict[str, list[int]] = {p.name: [] for p in spec.pools}
        self.heap: list[tuple[float, int, int]] = []  # (free at, replica, request being served or -1)
        self.pending: deque[int] = deque()
        self.resubmitted: dict[int, float] = {}
        self.outage: dict[str, bool] = {p.name: False for p in spec.pools}
        self.failures: Counter[str] = Counter()
        self.retry_at: dict[str, float] = {}
        self.moving: tuple[int, int] | None = None  # (old replica, its replacement)
        self.ttft: list[float] = []
        self.lost = self.retried = self.cold_starts = self.moves = self.pool_downs = self.peak = 0
        self.cost: float = 0.0
        self.replica_s: dict[str, float] = {p.name: 0.0 for p in spec.pools}
        self.T: list[float] = []
        self._trace = Trace()

    # The gateway's load signal (what the autoscaler reads).
    def load(self) -> dict[tuple[str, int], float]:
        now = self.now
        busy = sum(1 for f, _, j in self.heap if j >= 0 and f > now)
        return {KEY: float(busy + len(self.pending))}

    def run(self, trace: Trace) -> dict[str, Any]:
        started = time.perf_counter()
        self._trace, self.T = trace, trace.t
        T = trace.t
        self.ttft = [NAN] * len(T)
        n, i, tick = len(T), 0, 0.0
        while i < n or self.pending:
            self.now = tick
            self._drain(tick)
            self._control(tick)
            tick += self.tick_s
            i = self._arrivals(trace, i, tick)
        return self._report(trace, time.perf_counter() - started, tick)

    def _arrivals(self, tr: Trace, i: int, until: float) -> int:
        """Route every request arriving before `until` (the hot loop: locals only, one heap op per request)."""
        T, heap, alive, pending = tr.t, self.heap, self.alive, self.pending
        n = len(T)
        while i < n and T[i] < until:
            a = T[i]
            if pending:
                self._drain(a)
            if not pending:
                while heap and not alive[heap[0][1]]:
                    heapq.heappop(heap)
                if heap and heap[0][0] <= a:
                    self._serve(tr, i, heap[0][1], a)
                    i += 1
                    continue
            pending.append(i)
            i += 1
        return i

    def _serve(self, tr: Trace, i: int, rid: int, start: float) -> None:
        """Request i starts on replica `rid` (whose slot is the heap's top) at `start`."""
        prefill = tr.prompt[i]
        px = tr.prefix[i]
        if px >= 0:
            seen = self.cache[rid]
            if px in seen:
                prefill -= tr.prefix_tokens[i]
            else:
                seen.add(px)
        pf = prefill * self.inv_prefill
        self.ttft[i] = start - tr.t[i] + pf
        heapq.heapreplace(self.heap, (start + pf + tr.output[i] * self.tpot, rid, i))

    def _drain(self, t: float) -> None:
        """Held requests take the slots free by `t`, oldest first; one held past `max_wait_s` is lost."""
        heap, alive, pending, T, tr = self.heap, self.alive, self.pending, self.T, self._trace
        while pending:
            while heap and not alive[heap[0][1]]:
                heapq.heappop(heap)
            j = pending[0]
            since = self.resubmitted.get(j, T[j]) if self.resubmitted else T[j]
            free = heap[0][0] if heap else math.inf
            if min(free, t) - since > self.max_wait:
                pending.popleft()
                self.ttft[j] = NAN
                self.lost += 1
                continue
            if free > t:
                return
            pending.popleft()
            self._serve(tr, j, heap[0][1], max(free, since))

    # One reconcile tick: outages, failover, autoscaler, placement, moves, billing.
    def _control(self, t: float) -> None:
        self._outages(t)
        self._failover(t)
        self.autoscaler.observe()
        self.desired = self.autoscaler.desired(KEY, self.scaling, self.desired)
        self._scale(t)
        self._move(t)
        live = 0
        for name, ids in self.members.items():
            live += len(ids)
            self.replica_s[name] += len(ids) * self.tick_s
            self.cost += len(ids) * self.tick_s * self.pools[name].cost_per_hour / 3600.0
        self.peak = max(self.peak, live)

    def _outages(self, t: float) -> None:
        for name, pool in self.pools.items():
            out = any(a <= t < b for a, b in pool.outages)
            if out and not self.outage[name]:
                self._kill(self.members[name], t)
                self.members[name] = []
            self.outage[name] = out

    def _kill(self, ids: list[int], t: float) -> None:
        """Replicas lost with their pool: what they were serving goes back to the front of the queue."""
        dead = set(ids)
        for rid in dead:
            self.alive[rid] = False
        again = sorted((j for f, rid, j in self.heap if rid in dead and j >= 0 and f > t), reverse=True)
        self.heap = [e for e in self.heap if e[1] not in dead]
        heapq.heapify(self.heap)
        for j in again:
            self.pending.appendleft(j)
            self.resubmitted[j] = t
            self.ttft[j] = NAN
        self.retried += len(again)

    def _failover(self, t: float) -> None:
        checks = {name: "its cluster does not answer" if out else None for name, out in self.outage.items()}
        usable = {p.name for p in self.infos if p.usable}
        down = failing_pools([], {}, checks, {}, usable)
        for p in self.infos:
            if p.name in down:
                p.healthy = False
                self.failures[p.name] += 1
                self.pool_downs += 1
                self.retry_at[p.name] = t + retry_after_s(self.failures[p.name])
                self._kill(self.members[p.name], t)
                self.members[p.name] = []
            elif not p.healthy and t >= self.retry_at[p.name] and not checks[p.name]:
                p.healthy = True
            elif p.healthy and self.failures[p.name] and any(self.ready_at[r] <= t for r in self.members[p.name]):
                self.failures[p.name] = 0  # a ready replica there: the next loss starts the backoff afresh

    def _placement(self) -> Placement:
        return Placement(self.infos, Counter({("sim", 1, n): len(ids) for n, ids in self.members.items()}),
                         Counter({n: len(ids) for n, ids in self.members.items()}))

    def _reliable_count(self) -> int:
        return sum(len(ids) for n, ids in self.members.items() if self.pools[n].reliable)

    def _scale(self, t: float) -> None:
        target = self.policy.target(self.desired)
        live = sum(len(ids) for ids in self.members.values()) - (self.moving is not None)
        placement = self._placement()
        floor = self.policy.floor(self.desired)
        reliable = self._reliable_count()
        while live < target:
            pool = None
            if reliable < floor:
                pool = placement.choose("sim", 1, self.policy.reliable)
            pool = pool or placement.choose("sim", 1, self.policy.config)
            if pool is None:
                break
            reliable += self.pools[pool].reliable
            self._start(pool, t)
            live += 1
        if live > target:
            self._stop_extra(placement, live - target, floor)

    def _stop_extra(self, placement: Placement, extra: int, floor: int) -> None:
        """Stop replicas from the pools placement likes least (newest first), keeping the hedge's floor."""
        reliable = self._reliable_count()
        for name in reversed(placement.preference(self.policy.config)):
            ids = self.members[name]
            keep = max(0, floor - (reliable - len(ids))) if self.pools[name].reliable else 0
            while extra and len(ids) > keep and not (self.moving and ids[-1] in self.moving):
                self.alive[ids.pop()] = False
                reliable -= self.pools[name].reliable
                extra -= 1

    def _start(self, pool: str, t: float) -> int:
        lo, hi = self.pools[pool].cold_range()
        ready = t + (lo if lo == hi else self.rng.uniform(lo, hi))
        rid = len(self.alive)
        self.r_pool.append(pool)
        self.alive.append(True)
        self.ready_at.append(ready)
        self.cache.append(set())
        self.members[pool].append(rid)
        for _ in range(self.concurrency):
            heapq.heappush(self.heap, (ready, rid, -1))
        self.cold_starts += 1
        return rid

    def _move(self, t: float) -> None:
        """One replica at a time back to where placement wants it (a cheaper pool that returned, say): the old one
        stops once its replacement is ready, as the reconciler's `moving_to` does."""
        if self.moving is not None:
            old, new = self.moving
            if not self.alive[new] or not self.alive[old]:
                self.moving = None
            elif self.ready_at[new] <= t:
                self.alive[old] = False
                self.members[self.r_pool[old]].remove(old)
                self.moving = None
                self.moves += 1
            return
        ids = [rid for ids in self.members.values() for rid in ids]
        if not ids or any(self.ready_at[r] > t for r in ids):
            return
        pools, skip = [], self.policy.floor(self.desired)  # the hedge's reliable floor stays put
        for r in ids:
            if skip and self.pools[self.r_pool[r]].reliable:
                skip -= 1
            else:
                pools.append(self.r_pool[r])
        mv = self._placement().rebalance(self.policy.config, pools)
        if mv is not None and self.members[mv[0]]:
            self.moving = (self.members[mv[0]][-1], self._start(mv[1], t))

    def _report(self, tr: Trace, wall_s: float, end: float) -> dict[str, Any]:
        slo = self.slo_s
        served = sorted(x for x in self.ttft if x == x)
        n = len(tr)

        def pct(q: float) -> float:
            return round(served[min(len(served) - 1, int(q * len(served)))] * 1000, 1) if served else NAN

        return {"policy": self.policy.name, "requests": n, "served": len(served), "lost": self.lost,
                "retried": self.retried, "ttft_p50_ms": pct(0.5), "ttft_p99_ms": pct(0.99),
                "slo_ttft_ms": round(slo * 1000, 1),
                "slo_attainment": round(sum(1 for x in served if x <= slo) / n, 5) if n else NAN,
                "cost": round(self.cost, 2), "cold_starts": self.cold_starts, "moves": self.moves,
                "pool_downs": self.pool_downs, "peak_replicas": self.peak,
                "replica_hours": {k: round(v / 3600, 2) for k, v in self.replica_s.items()},
                "simulated_s": round(end, 1), "wall_s": round(wall_s, 3),
                "requests_per_wall_s": round(n / wall_s) if wall_s > 0 else None}
