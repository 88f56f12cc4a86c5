"""Rebalance: when a version's replicas sit worse than placement would put them now (a pool is back after a
failover), one replica moves; the pure decision the scaling pass makes."""

from __future__ import annotations

from ballast.config import BallastConfig
from ballast.control.placement import Placement, PoolInfo


def cfg(**placement: object) -> BallastConfig:
    return BallastConfig.model_validate({"name": "svc", "placement": placement})


def test_spread_moves_one_replica_back_to_a_pool_that_returned() -> None:
    infos = [PoolInfo("local", default=True), PoolInfo("b")]
    reps = [("svc", 1, "local"), ("svc", 1, "local")]
    p = Placement.of(infos, reps)
    assert p.rebalance(cfg(), ["local", "local"]) == ("local", "b")
    # Balanced (or off by one): nothing moves.
    assert p.rebalance(cfg(), ["local", "b"]) is None
    assert p.rebalance(cfg(), ["local", "local", "b"]) is None
    assert p.rebalance(cfg(), ["b", "b", "b"]) == ("b", "local")
    # The pool is still down, draining or full: nothing moves.
    for b in (PoolInfo("b", healthy=False), PoolInfo("b", state="draining"), PoolInfo("b", max_replicas=0)):
        assert Placement.of([PoolInfo("local", default=True), b], reps).rebalance(cfg(), ["local", "local"]) is None
    # Pinned pools only: a third pool that is not pinned never takes one.
    p = Placement.of([*infos, PoolInfo("c")], reps)
    assert p.rebalance(cfg(pools=["local"]), ["local", "local"]) is None
    assert p.rebalance(cfg(pools=["local", "c"]), ["local", "local"]) == ("local", "c")


def test_fill_in_order_moves_a_replica_to_a_preferred_pool_with_room() -> None:
    infos = [PoolInfo("local", default=True), PoolInfo("b", max_replicas=1)]
    pinned = cfg(pools=["b", "local"], spread=False)
    p = Placement.of(infos, [("svc", 1, "local"), ("svc", 1, "local")])
    assert p.rebalance(pinned, ["local", "local"]) == ("local", "b")
    # b is full now (one replica): the other stays where it is.
    p = Placement.of(infos, [("svc", 1, "b"), ("svc", 1, "local")])
    assert p.rebalance(pinned, ["b", "local"]) is None
    # Already in the preferred pool.
    assert Placement.of(infos, []).rebalance(cfg(pools=["local", "b"], spread=False), ["local", "local"]) is None
    # Replicas in a pool that is down are failover's business, not rebalance's.
    down = [PoolInfo("local", default=True, healthy=False), PoolInfo("b")]
    assert Placement.of(down, []).rebalance(pinned, ["local"]) is None


def test_cheapest_moves_a_replica_back_to_the_cheaper_pool_when_it_recovers() -> None:
    spot, ondemand = PoolInfo("spot", cost_per_hour=1.0), PoolInfo("ondemand", cost_per_hour=3.0)
    infos = [PoolInfo("local", default=True, cost_per_hour=5.0), spot, ondemand]
    # spot was down: its replicas were replaced in on-demand. Back: one moves at a time, keeping two pools.
    p = Placement.of(infos, [("svc", 1, "ondemand")] * 3)
    assert p.rebalance(cfg(), ["ondemand"] * 3) == ("ondemand", "spot")
    p = Placement.of(infos, [("svc", 1, "spot"), ("svc", 1, "ondemand"), ("svc", 1, "ondemand")])
    assert p.rebalance(cfg(), ["spot", "ondemand", "ondemand"]) == ("ondemand", "spot")
    # The last on-demand replica stays: one pool's loss must not take them all.
    assert p.rebalance(cfg(), ["spot", "spot", "ondemand"]) is None
    # A replica in the dearest pool moves to a cheaper one with room.
    assert p.rebalance(cfg(), ["spot", "local"]) == ("local", "ondemand")
    # spot still down: nothing better to move to.
    down = [PoolInfo("local", default=True, cost_per_hour=5.0), PoolInfo("spot", cost_per_hour=1.0, healthy=False),
            ondemand]
    assert Placement.of(down, []).rebalance(cfg(), ["ondemand", "local"]) is None
    # spread: false lets every replica sit in the cheapest pool.
    assert p.rebalance(cfg(spread=False), ["spot", "ondemand"]) == ("ondemand", "spot")
