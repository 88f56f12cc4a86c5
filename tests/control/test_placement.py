"""Placement and the pool failover decision: pure functions, the ones the reconciler calls."""

from __future__ import annotations

from ballast.config import BallastConfig
from ballast.control.actuator import ReplicaRow
from ballast.control.failover import failing_pools
from ballast.control.health import Verdict
from ballast.control.placement import Placement, PoolInfo


def cfg(**placement: object) -> BallastConfig:
    return BallastConfig.model_validate({"name": "svc", "placement": placement})


def pools() -> list[PoolInfo]:
    return [PoolInfo("local", default=True), PoolInfo("b"), PoolInfo("c", max_replicas=1)]


def test_spread_fills_the_pool_with_fewest_of_the_version_then_fewest_overall() -> None:
    p = Placement.of(pools(), [("other", 1, "b"), ("other", 1, "b")])
    got = [p.choose("svc", 1, cfg(prefer="spread")) for _ in range(5)]
    # local first (the default, empty), then c (b holds two of another version), then b; c is full after one.
    assert got == ["local", "c", "b", "local", "b"]


def test_pinned_pools_in_order_and_fill_without_spread() -> None:
    p = Placement.of(pools(), [])
    assert [p.choose("svc", 1, cfg(pools=["b", "local"], spread=False)) for _ in range(3)] == ["b", "b", "b"]
    p = Placement.of(pools(), [])
    assert [p.choose("svc", 1, cfg(pools=["b", "local"])) for _ in range(3)] == ["b", "local", "b"]


def priced() -> list[PoolInfo]:
    return [PoolInfo("local", default=True, cost_per_hour=4.0), PoolInfo("spot", cost_per_hour=1.0, max_replicas=3),
            PoolInfo("ondemand", cost_per_hour=3.0)]


def test_by_default_the_cheapest_pool_fills_but_a_version_keeps_to_two_pools() -> None:
    p = Placement.of(priced(), [])
    got = [p.choose("svc", 1, cfg()) for _ in range(5)]
    # spot is cheapest; the second replica goes to the next cheapest so one pool's loss never takes both;
    # spot fills to its capacity, then the next cheapest pool with room.
    assert got == ["spot", "ondemand", "spot", "spot", "ondemand"]
    p = Placement.of(priced(), [])
    assert [p.choose("svc", 1, cfg(spread=False)) for _ in range(4)] == ["spot", "spot", "spot", "ondemand"]
    p = Placement.of(priced(), [])
    assert [p.choose("svc", 1, cfg(spread=3)) for _ in range(4)] == ["spot", "ondemand", "local", "spot"]
    p = Placement.of(priced(), [])
    assert [p.choose("svc", 1, cfg(prefer="ordered", spread=False)) for _ in range(2)] == ["local", "local"]
    # Another version elsewhere does not count toward this one's spread.
    p = Placement.of(priced(), [("other", 1, "ondemand")])
    assert [p.choose("svc", 1, cfg()) for _ in range(2)] == ["spot", "ondemand"]


def test_cheapest_skips_unusable_pools_and_keeps_pins() -> None:
    infos = priced()
    infos[1].healthy = False
    p = Placement.of(infos, [])
    assert [p.choose("svc", 1, cfg()) for _ in range(3)] == ["ondemand", "local", "ondemand"]
    p = Placement.of(priced(), [])
    assert [p.choose("svc", 1, cfg(pools=["local", "ondemand"])) for _ in range(3)] == [
        "ondemand", "local", "ondemand"]


def test_placement_config_rejects_a_negative_spread() -> None:
    import pydantic
    import pytest
    with pytest.raises(pydantic.ValidationError):
        cfg(spread=-1)
    with pytest.raises(pydantic.ValidationError):
        cfg(prefer="random")


def test_no_pool_says_why() -> None:
    infos = [PoolInfo("local", default=True, healthy=False), PoolInfo("b", state="draining"),
             PoolInfo("c", max_replicas=1)]
    p = Placement.of(infos, [("x", 1, "c")])
    assert p.choose("svc", 1, cfg()) is None
    assert p.why_none(cfg()) == "no pool can take it: local down, b draining, c full (1 replicas)"
    assert p.why_none(cfg(pools=["mars"])) == "no pool can take it: mars unknown"


def row(rid: str, pool: str, state: str = "ready") -> ReplicaRow:
    return ReplicaRow(rid, "svc", 1, state, 100, None, None, None, pool, None, 0, {})


def test_a_pool_fails_over_when_its_backend_is_gone_or_every_replica_failed() -> None:
    reps = [row("a", "local"), row("b1", "b"), row("b2", "b")]
    fail = Verdict(kind="fail", reason="exited with code -9")
    usable = {"local", "b"}
    assert failing_pools(reps, {"b1": fail}, {}, {}, usable) == {}  # one of two: a replica's failure
    assert failing_pools(reps, {"b1": fail, "b2": fail}, {}, {}, usable) == {
        "b": "all 2 of its replicas failed: exited with code -9"}
    assert failing_pools(reps, {}, {"b": "its cluster does not answer"}, {}, usable) == {
        "b": "its cluster does not answer"}
    assert failing_pools(reps, {}, {}, {"b": "could not start: FileExistsError"}, usable) == {}  # b runs replicas
    assert failing_pools(reps[:1], {}, {}, {"b": "could not start"}, usable) == {
        "b": "replicas cannot start there: could not start"}


def test_replica_failures_never_take_down_the_last_usable_pool() -> None:
    fail = Verdict(kind="fail", reason="boom")
    reps = [row("a", "local"), row("b1", "b")]
    assert failing_pools(reps, {"a": fail, "b1": fail}, {}, {}, {"local", "b"}) == {}
    assert failing_pools(reps, {"b1": fail}, {}, {}, {"b"}) == {}
    # An unreachable backend is down whatever is left.
    assert failing_pools(reps, {"a": fail}, {"b": "gone"}, {}, {"local", "b"}) == {"b": "gone"}
