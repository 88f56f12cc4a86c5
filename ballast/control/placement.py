"""Placement: which capacity pool a new replica goes to (pure: plain values in, a pool name out).

A pool takes new replicas while it is active (not draining), healthy (not failed over) and under its
capacity. A deployment may pin its replicas to pools (`placement.pools` in ballast.yaml). By default
replicas spread: each new one goes to the usable pool with the fewest replicas of its version, so the loss
of one pool never takes every replica of a deployment that runs two or more; ties go to the pool with the
fewest replicas overall, then to the default pool, then by name. With `spread: false` pools fill in order.

`rebalance` says when a version's replicas sit worse than this policy would put them (after a failover moved
them off a pool that is back, say): one replica to move, from which pool to which.
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

    def candidates(self, config: BallastConfig) -> list[PoolInfo]:
        """Usable pools with room that the deployment allows, in its order of preference."""
        pinned = config.placement.pools
        pools = [p for p in self.pools if p.usable and (p.max_replicas is None or self.per_pool[p.name] <
                                                         p.max_replicas)]
        if pinned:
            by_name = {p.name: p for p in pools}
            return [by_name[n] for n in pinned if n in by_name]
        return sorted(pools, key=lambda p: (not p.default, p.name))

    def choose(self, dep: str, version: int, config: BallastConfig) -> str | None:
        """The pool for one new replica of (dep, version); None when no pool may take it (see `why_none`)."""
        options = self.candidates(config)
        if not options:
            return None
        if config.placement.spread:
            rank = {p.name: i for i, p in enumerate(options)}
            best = min(options, key=lambda p: (self.per_version[(dep, version, p.name)], self.per_pool[p.name],
                                               rank[p.name]))
        else:
            best = options[0]
        self.add(dep, version, best.name)
        return best.name

    def preference(self, config: BallastConfig) -> list[str]:
        """Usable pools the deployment allows, best first, whether or not they have room."""
        usable = sorted((p for p in self.pools if p.usable), key=lambda p: (not p.default, p.name))
        names = [p.name for p in usable]
        return [n for n in config.placement.pools if n in names] if config.placement.pools else names

    def rebalance(self, config: BallastConfig, pools: list[str]) -> tuple[str, str] | None:
        """(from, to): one replica of a version whose replicas are in `pools` (one entry each) to move to another
        pool, when placement would now put it there: spread, a pool holding two or more replicas more than a pool
        with room; filling in order, a replica in a pool after one with room. None when placement is as good as it
        gets. Replicas in pools that are down or draining are not this function's business (failover, drain)."""
        order = self.preference(config)
        rank = {n: i for i, n in enumerate(order)}
        mine = Counter(p for p in pools if p in rank)
        options = [p.name for p in self.candidates(config)]
        if not mine or not options:
            return None
        if config.placement.spread:
            frm = max(mine, key=lambda n: (mine[n], rank[n]))
            to = min(options, key=lambda n: (mine[n], self.per_pool[n], rank[n]))
            return (frm, to) if mine[frm] - mine[to] >= 2 else None
        frm = max(mine, key=lambda n: rank[n])
        return (frm, options[0]) if rank[options[0]] < rank[frm] else None

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
