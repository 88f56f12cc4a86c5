"""Placement: which capacity pool a new replica goes to (pure: plain values in, a pool name out).

A pool takes new replicas while it is active (not draining), healthy (not failed over) and under its
capacity. A deployment may pin its replicas to pools (`placement.pools` in ballast.yaml). By default
(`prefer: cheapest`) a new replica goes to the cheapest usable pool (`cost_per_hour`; unpriced counts as free;
ties: the default pool, then the pinned order, then by name), except that a version's replicas keep to at least
`spread` pools (2 by default), so the loss of one pool never takes every replica of a deployment that runs two
or more. `prefer: spread` puts each new one where its version has fewest (ties: fewest overall, then the order
above); `prefer: ordered` ignores prices.

`rebalance` says when a version's replicas sit worse than this policy would put them (after a failover moved
them off a cheaper pool that is back, say): one replica to move, from which pool to which.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ballast.config import BallastConfig


@dataclass
class PoolInfo:
    """A pool as placement sees it (mirrors the `pools` row)."""

    name: str
    kind: str = "local"
    state: str = "active"
    healthy: bool = True
    max_replicas: int | None = None
    region: str = ""
    labels: dict[str, Any] = field(default_factory=dict)
    default: bool = False
    cloud: str = ""
    cost_per_hour: float | None = None  # per replica; None: not priced (ranked as free)

    @property
    def usable(self) -> bool:
        return self.state == "active" and self.healthy


@dataclass
class Placement:
    """The pools and the replicas in each, kept current while one scaling pass places replicas."""

    pools: list[PoolInfo]
    per_version: Counter[tuple[str, int, str]] = field(default_factory=Counter)  # (dep, version, pool)
    per_pool: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, pools: list[PoolInfo], replicas: Iterable[tuple[str, int, str]]) -> Placement:
        """`replicas`: (deployment, version, pool) of every replica that holds or waits for capacity."""
        p = cls(pools)
        for dep, version, pool in replicas:
            p.add(dep, version, pool)
        return p

    def add(self, dep: str, version: int, pool: str) -> None:
        self.per_version[(dep, version, pool)] += 1
        self.per_pool[pool] += 1

    def usable(self) -> set[str]:
        return {p.name for p in self.pools if p.usable}

    def _rank(self, config: BallastConfig) -> dict[str, tuple[float, int, bool, str]]:
        """Every pool's place in the deployment's order of preference (lower is better)."""
        pinned = {n: i for i, n in enumerate(config.placement.pools)}
        cheap = config.placement.prefer != "ordered"
        return {p.name: ((p.cost_per_hour or 0.0) if cheap else 0.0, pinned.get(p.name, 0), not p.default, p.name)
                for p in self.pools}

    def candidates(self, config: BallastConfig) -> list[PoolInfo]:
        """Usable pools with room that the deployment allows, in its order of preference."""
        pinned = config.placement.pools
        rank = self._rank(config)
        pools = [p for p in self.pools if p.usable and (p.max_replicas is None or self.per_pool[p.name] <
                                                         p.max_replicas) and (not pinned or p.name in pinned)]
        return sorted(pools, key=lambda p: rank[p.name])

    def choose(self, dep: str, version: int, config: BallastConfig) -> str | None:
        """The pool for one new replica of (dep, version); None when no pool may take it (see `why_none`)."""
        options = self.candidates(config)
        if not options:
            return None
        if config.placement.prefer == "spread" and config.placement.spread is not False:
            rank = {p.name: i for i, p in enumerate(options)}
            best = min(options, key=lambda p: (self.per_version[(dep, version, p.name)], self.per_pool[p.name],
                                               rank[p.name]))
        else:
            held = {n for n in self.preference(config) if self.per_version[(dep, version, n)]}
            fresh = [p for p in options if p.name not in held]
            best = fresh[0] if len(held) < config.placement.spread_pools and fresh else options[0]
        self.add(dep, version, best.name)
        return best.name

    def preference(self, config: BallastConfig) -> list[str]:
        """Usable pools the deployment allows, best first, whether or not they have room."""
        rank = self._rank(config)
        pinned = config.placement.pools
        return sorted((p.name for p in self.pools if p.usable and (not pinned or p.name in pinned)),
                      key=lambda n: rank[n])

    def rebalance(self, config: BallastConfig, pools: list[str]) -> tuple[str, str] | None:
        """(from, to): one replica of a version whose replicas are in `pools` (one entry each) to move to another
        pool, when placement would now put it there: spreading evenly, a pool holding two or more replicas more
        than a pool with room; else too few pools held (one with two or more replicas gives one up), or a replica
        in a pool worse than one with room, where moving keeps the spread. None when placement is as good as it
        gets. Replicas in pools that are down or draining are not this function's business (failover, drain)."""
        order = self.preference(config)
        rank = {n: i for i, n in enumerate(order)}
        mine = Counter(p for p in pools if p in rank)
        options = [p.name for p in self.candidates(config)]
        if not mine or not options:
            return None
        if config.placement.prefer == "spread" and config.placement.spread is not False:
            frm = max(mine, key=lambda n: (mine[n], rank[n]))
            to = min(options, key=lambda n: (mine[n], self.per_pool[n], rank[n]))
            return (frm, to) if mine[frm] - mine[to] >= 2 else None
        return _better(mine, options, rank, min(config.placement.spread_pools, len(order)))

    def why_none(self, config: BallastConfig) -> str:
        """Why `choose` found no pool, for the pending replica's reason."""
        pinned = config.placement.pools
        parts = []
        for p in self.pools:
            if pinned and p.name not in pinned:
                continue
            if not p.usable:
                parts.append(f"{p.name} {'draining' if p.state != 'active' else 'down'}")
            elif p.max_replicas is not None and self.per_pool[p.name] >= p.max_replicas:
                parts.append(f"{p.name} full ({p.max_replicas} replicas)")
        missing = [n for n in pinned if n not in {p.name for p in self.pools}]
        parts += [f"{n} unknown" for n in missing]
        return "no pool can take it" + (f": {', '.join(parts)}" if parts else "")


def _better(mine: Counter[str], options: list[str], rank: dict[str, int], spread: int) -> tuple[str, str] | None:
    """One move toward the cheapest placement that keeps the version in at least `spread` pools."""
    if len(mine) < spread:
        fresh = [n for n in options if n not in mine]
        frm = max(mine, key=lambda n: (mine[n], rank[n]))
        return (frm, fresh[0]) if fresh and mine[frm] >= 2 else None
    for frm in sorted(mine, key=lambda n: -rank[n]):
        for to in options:
            if rank[to] >= rank[frm]:
                break
            held = len(mine) - (mine[frm] == 1) + (to not in mine)
            if held >= spread:
                return frm, to
    return None
