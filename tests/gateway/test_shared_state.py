"""Shared gateway state against a real `redis-server` (started on a free port): two gateways' `RedisState`s in one
process share per-key limits, budgets, prefix affinity and load; Redis killed -> local judgement, back -> shared.

The gateways are real `Gateway` objects over a fixed routing table (their control-plane source is a plain class);
the end-to-end version with two `ballast up` processes is tests/platform/test_shared_platforms.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from ballast.control.autoscaler import Autoscaler
from ballast.control.keys import KeyRecord
from ballast.gateway.limits import KeyLimiter
from ballast.gateway.metering import UsageCounts, UsageKey
from ballast.gateway.routing import Endpoint, Router, prefix_key
from ballast.gateway.service import DeploymentRoute, Gateway, VersionRoute
from ballast.gateway.shared import FleetLoad, RedisState, install_shared, safe_redis_url
from ballast.openai import APIError
from tests.redis_server import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FixedSource:
    """A control plane that never changes: one deployment `d`, version 1, replicas r1 and r2."""

    def __init__(self, keys: list[KeyRecord]):
        self.keys = keys

    def snapshot(self) -> tuple[list[KeyRecord], dict[str, DeploymentRoute]]:
        eps = [Endpoint("r1", "http://127.0.0.1:9/r1", 1), Endpoint("r2", "http://127.0.0.1:9/r2", 1)]
        return self.keys, {"d": DeploymentRoute("d", True, {1: VersionRoute(1, eps)}, {"production": [(1, 100)]},
                                                prefix_routing=True)}

    def generation(self) -> int:
        return 0

    async def write_usage(self, batch: dict[UsageKey, UsageCounts]) -> None:
        return None

    def request_capacity(self, deployment: str, version: int) -> None:
        return None


KEYS = [KeyRecord("rpm3", "hash-of-a-secret", frozenset({"inference"}), rpm=3),
        KeyRecord("tpm50", "h2", frozenset({"inference"}), tpm=50),
        KeyRecord("budget100", "h3", frozenset({"inference"}), token_budget=100, budget_per="day"),
        KeyRecord("free", "h4", frozenset({"inference"}))]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    r = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield r
    finally:
        r.stop()


def _gateway(server: RedisServer, prefix: str) -> tuple[Gateway, RedisState]:
    gw = Gateway(FixedSource(KEYS), CollectorRegistry())
    gw.refresh()
    autoscaler = Autoscaler(signal=gw)
    return gw, install_shared(gw, autoscaler, server.url, prefix)


@pytest.fixture
async def pair(server: RedisServer, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, Any]]:
    prefix = f"t-{request.node.name}:"
    a, b = _gateway(server, prefix), _gateway(server, prefix)
    try:
        yield a, b
    finally:
        for _, s in (a, b):
            await s.stop()


async def _admitted(pairs: list[tuple[Gateway, RedisState]], key: str, n: int) -> tuple[int, list[APIError]]:
    ok, refused = 0, []
    for i in range(n):
        gw, state = pairs[i % len(pairs)]
        try:
            await state.admit(gw.limiters[key])
            ok += 1
        except APIError as e:
            refused.append(e)
    return ok, refused


async def test_requests_per_minute_are_one_bucket_across_gateways(pair: Any) -> None:
    ok, refused = await _admitted(list(pair), "rpm3", 10)
    assert ok == 3  # each gateway's own bucket would have let 3 through: 6 in all
    assert {e.status for e in refused} == {429} and {e.code for e in refused} == {"rate_limit_requests"}
    assert all(15 <= int(e.headers["Retry-After"]) <= 20 for e in refused)  # one request back in 60/3 s
    # A key without limits never touches Redis and is never refused.
    assert (await _admitted(list(pair), "free", 50))[0] == 50


async def test_tokens_and_budgets_charged_through_one_gateway_refuse_in_the_other(pair: Any) -> None:
    (ga, sa), (gb, sb) = pair
    await sb.admit(gb.limiters["tpm50"])
    sa.finished(ga.limiters["tpm50"], "d", 1, 80)  # 30 tokens over the minute's 50
    await sb.admit(gb.limiters["budget100"])
    sa.finished(ga.limiters["budget100"], "d", 1, 120)  # over the day's budget
    await sa.flush()
    with pytest.raises(APIError) as e:
        await sb.admit(gb.limiters["tpm50"])
    assert e.value.code == "rate_limit_tokens" and 30 <= int(e.value.headers["Retry-After"]) <= 37
    with pytest.raises(APIError) as e:
        await sb.admit(gb.limiters["budget100"])
    assert e.value.code == "budget_exceeded" and int(e.value.headers["Retry-After"]) >= 1
    # Without sharing, gateway b's own buckets know nothing of it.
    gb.limiters["tpm50"].admit()
    gb.limiters["budget100"].admit()


async def test_a_charge_rides_along_with_the_keys_next_request(pair: Any, server: RedisServer) -> None:
    (ga, sa), (gb, sb) = pair
    await sa.admit(ga.limiters["budget100"])
    sa.finished(ga.limiters["budget100"], "d", 1, 70)
    await sa.admit(ga.limiters["budget100"])  # carries the 70 tokens: charged before it is judged
    r = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        names = [k async for k in r.scan_iter(sa.prefix + "budget:*")]
        assert len(names) == 1 and await r.get(names[0]) == "70"
    finally:
        await r.aclose()
    assert sa._charges == {}
    sa.finished(ga.limiters["budget100"], "d", 1, 40)
    await sa.flush()  # no request of the key came: written on its own
    with pytest.raises(APIError) as e:
        await sb.admit(gb.limiters["budget100"])
    assert e.value.code == "budget_exceeded"


async def test_prefixes_keep_their_replica_across_gateways(pair: Any) -> None:
    (ga, sa), (gb, sb) = pair
    key = prefix_key({"prompt": "a long shared system prompt " * 40}, None)
    eps_a = ga.routes["d"].versions[1].endpoints
    eps_b = gb.routes["d"].versions[1].endpoints
    # Gateway a sees load on the replica the prefix would go to by hashing: it places the prefix on the other.
    first = ga.router.choose(list(eps_a), key=key)
    assert first is not None
    for ep in eps_a:
        ep.outstanding = 0 if ep.replica_id != first.replica_id else 5
    ga.router._affinity.clear()  # as if a never saw this prefix either
    placed = ga.router.choose(list(eps_a), key=key)
    assert placed is not None and placed.replica_id != first.replica_id
    await sa.flush()
    # Idle gateway b would pick `first` by hashing (as a router that shares nothing does); it learns from Redis
    # where a put the prefix.
    assert Router().choose(list(eps_b), key=key).replica_id == first.replica_id  # type: ignore[union-attr]
    await sb.admit(None, gb.router, key)  # no limits to judge: only where the prefix went
    assert gb.router.choose(list(eps_b), key=key).replica_id == placed.replica_id  # type: ignore[union-attr]
    # A limited key learns it in the same round trip as its limits (the admit script).
    gb.router._affinity.clear()
    await sb.admit(gb.limiters["rpm3"], gb.router, key)
    assert gb.router.choose(list(eps_b), key=key).replica_id == placed.replica_id  # type: ignore[union-attr]


async def test_each_gateway_adds_the_others_load(pair: Any) -> None:
    (ga, sa), (gb, sb) = pair
    for ep in gb.routes["d"].versions[1].endpoints:
        ep.outstanding = 3
    await sb.publish()
    await sa.publish()
    assert sa.others() == {("d", 1): 6.0}
    signal = FleetLoad(ga, sa)
    assert signal.load() == {("d", 1): 6.0}  # a's own load is 0
    assert sa.m_gateways._value.get() == 2
    await sb.stop()  # a stopped gateway leaves at once, not after its TTL
    await sa.publish()
    assert sa.others() == {} and sa.m_gateways._value.get() == 1


async def test_secrets_never_reach_redis_and_prefixes_keep_platforms_apart(server: RedisServer) -> None:
    a, other = _gateway(server, "ns-a:"), _gateway(server, "ns-b:")
    try:
        assert (await _admitted([a], "rpm3", 4))[0] == 3
        assert (await _admitted([other], "rpm3", 4))[0] == 3  # another platform's key of the same id
        r = aioredis.Redis.from_url(server.url, decode_responses=True)
        names = [k async for k in r.scan_iter("ns-*")]
        await r.aclose()
        assert names and all(k.startswith(("ns-a:", "ns-b:")) for k in names)
        assert not any("hash-of-a-secret" in k for k in names)
    finally:
        await a[1].stop()
        await other[1].stop()


async def test_redis_down_judges_locally_then_shares_again(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r").start()
    try:
        (ga, sa), (gb, sb) = _gateway(server, "down:"), _gateway(server, "down:")
        await sa.start()
        await sb.start()
        server.stop()
        # No request fails for it: the first one that finds Redis gone is judged locally, and so are the rest.
        ok, refused = await _admitted([(ga, sa), (gb, sb)], "rpm3", 10)
        assert ok == 6 and len(refused) == 4  # each gateway's own bucket of 3
        assert not sa.up and not sb.up and sa.m_up._value.get() == 0
        assert sa.m_fallbacks._value.get() == 5
        assert (await _admitted([(ga, sa)], "free", 5))[0] == 5
        server = RedisServer(tmp_path / "r", port=server.port).start()
        for _ in range(100):
            if sa.up and sb.up:
                break
            await asyncio.sleep(0.1)
        assert sa.up and sb.up and sa.m_up._value.get() == 1
        ga.limiters["tpm50"] = KeyLimiter(KEYS[1])
        gb.limiters["tpm50"] = KeyLimiter(KEYS[1])
        sa.finished(ga.limiters["tpm50"], "d", 1, 60)
        await sa.flush()
        with pytest.raises(APIError):
            await sb.admit(gb.limiters["tpm50"])  # shared again: b's own bucket is still full
        await sa.stop()
        await sb.stop()
    finally:
        server.stop()


def test_redis_url_passwords_stay_out_of_logs() -> None:
    assert safe_redis_url("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert safe_redis_url("redis://:s3cret@host/0") == "redis://:***@host/0"
    assert safe_redis_url("redis://host:6379/0") == "redis://host:6379/0"
