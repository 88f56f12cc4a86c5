"""Two `ballast up --ha --redis-url` processes on one store and one real `redis-server` (started here, on a free
port): a key's limits hold across both gateways, a prompt prefix keeps its replica whichever gateway it comes
through, the leader's autoscaler sees load sent only through the other platform, and killing Redis fails no
request (each gateway judges limits alone) until it is back.

The tests share the two platforms and run in file order.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from ballast.gateway.routing import _score, prefix_key
from tests.conftest import write_package
from tests.control.platform import Platform, kill_leftovers, pid_alive
from tests.platform.test_ha import leaders
from tests.redis_server import RedisServer
from tests.store.databases import postgres_database

MODEL = """
import os
import time


class Model:
    def predict(self, inputs):
        time.sleep(float(inputs.get("sleep", 0)) if isinstance(inputs, dict) else 0)
        return {"replica": os.environ["BALLAST_REPLICA_ID"]}

    def completions(self, request):
        time.sleep(float(request.get("sleep", 0)))
        n = len(str(request.get("prompt", "")).split())
        return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": request.get("model"),
                "choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1}}
"""

YAML = """
name: shared
runtime: {shutdown_grace_s: 2, predict_concurrency: 8}
health: {liveness_period_s: 0.5}
routing: {policy: prefix}
autoscaling: {min_replicas: 2, max_replicas: 3, window_s: 2, scale_down_delay_s: 600}
"""


PREFIX = "shared-test:"


class Fleet:
    def __init__(self, redis: RedisServer, a: Platform, b: Platform):
        self.redis, self.a, self.b = redis, a, b


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def fleet(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    """Both platforms on one store: SQLite (one machine), or PostgreSQL as a fleet on several machines would be."""
    root = tmp_path_factory.mktemp("shared")
    if request.param == "sqlite":
        yield from _fleet(root, None)
    else:
        for url in postgres_database():
            yield from _fleet(root, url)


def _fleet(root: Path, database_url: str | None) -> Iterator[Fleet]:
    server = RedisServer(root / "redis").start()
    args = ("--ha", "--redis-url", server.url, "--redis-prefix", PREFIX)
    a = Platform(root / "home", database_url, args=args).start()
    b: Platform | None = None
    pids: list[int] = []
    try:
        a.wait("a leads", lambda: leaders(a), timeout=30)
        b = Platform(root / "home", database_url, args=args).start()
        b.cli("deploy", str(write_package(root / "pkg", YAML, MODEL)), "--wait", "--timeout", "120")  # b: saved last
        a.wait("two ready replicas", lambda: len(_ready(a)) == 2, timeout=120)
        yield Fleet(server, a, b)
    finally:
        for p in (a, b):
            if p is not None and p.proc is not None and p.proc.poll() is None:
                pids += p.replica_pids()
        for p in (b, a):
            if p is not None and p.proc is not None:
                p.stop()
        kill_leftovers([pid for pid in set(pids) if pid_alive(pid)])
        server.stop()


def _ready(p: Platform) -> list[dict[str, Any]]:
    return [r for r in p.show("shared")["replicas"] if r["state"] == "ready"]


def _post(p: Platform, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
    return httpx.post(p.url + path, headers={"Authorization": f"Bearer {key or p.key}"}, timeout=60, **kw)


def _key(f: Fleet, **limits: Any) -> str:
    """A new key, made through a; returned once b's gateway knows it too."""
    return _new_key(f, **limits)["key"]


def _new_key(f: Fleet, **limits: Any) -> dict[str, Any]:
    created: dict[str, Any] = f.a.api("POST", "/keys", expect=201, json={"scopes": ["inference"], **limits})
    secret = created["key"]
    for p in (f.a, f.b):
        p.wait("the key known", lambda p=p: httpx.get(p.url + "/v1/models", timeout=10, headers={
            "Authorization": f"Bearer {secret}"}).status_code == 200, timeout=30)
    return created


def _alternating(f: Fleet, key: str, n: int) -> list[httpx.Response]:
    return [_post((f.a, f.b)[i % 2], "/deployments/shared/predict", key, json={}) for i in range(n)]


def _metric(p: Platform, name: str) -> float | None:
    text = httpx.get(p.url + "/metrics", headers={"Authorization": f"Bearer {p.key}"}, timeout=10).text
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def _published_load(f: Fleet) -> float:
    """The in-flight load of `shared` every gateway last published to Redis."""
    r = redis.Redis.from_url(f.redis.url, decode_responses=True)
    try:
        names = list(r.scan_iter(PREFIX + "load:*"))
        values = [json.loads(v) for v in (r.mget(names) if names else []) if v]
    finally:
        r.close()
    return sum(x for v in values for d, _, x in v["load"] if d == "shared")


def _redis_get(f: Fleet, pattern: str) -> int | None:
    r = redis.Redis.from_url(f.redis.url, decode_responses=True)
    try:
        names = list(r.scan_iter(pattern))
        return int(r.get(names[0]) or 0) if names else None
    finally:
        r.close()


def test_a_requests_per_minute_limit_holds_across_both_gateways(fleet: Fleet) -> None:
    answers = _alternating(fleet, _key(fleet, rpm=3), 10)
    assert [r.status_code for r in answers].count(200) == 3, [r.status_code for r in answers]
    refused = [r for r in answers if r.status_code != 200]
    assert {r.status_code for r in refused} == {429}
    assert {r.json()["error"]["code"] for r in refused} == {"rate_limit_requests"}
    assert all(int(r.headers["retry-after"]) >= 1 and r.headers.get("x-request-id") for r in refused)
    assert _metric(fleet.a, "ballast_gateway_live_gateways") == 2


def test_a_token_budget_spent_through_one_gateway_is_spent_in_the_other(fleet: Fleet) -> None:
    created = _new_key(fleet, token_budget=50, per="day")
    key = created["key"]
    body = {"model": "shared", "prompt": "words " * 60}
    first = _post(fleet.a, "/v1/completions", key, json=body)
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] == 61
    # a writes the charge within 50 ms (sooner when the key's next request through a carries it), long before
    # its usage reaches the store (about a second), which is all b would know of without Redis.
    fleet.a.wait("the charge in Redis", lambda: _redis_get(fleet, f"{PREFIX}budget:{{{created['id']}}}:*") == 61,
                 timeout=5, every=0.02)
    second = _post(fleet.b, "/v1/completions", key, json=body)
    assert second.status_code == 429 and second.json()["error"]["code"] == "budget_exceeded", second.text


def _prompt(word: str, want: str, replicas: list[str]) -> str:
    """A long prompt that, on an idle gateway, goes to `want` (rendezvous hashing over `replicas`)."""
    for i in range(1000):
        prompt = f"{word} {i}: " + "a long shared system prompt for every turn. " * 30
        key = prefix_key({"prompt": prompt}, None)
        assert key is not None
        if max(replicas, key=lambda r: _score(key, r)) == want:
            return prompt
    raise AssertionError("no prompt hashes to the replica")


def test_a_prefix_keeps_its_replica_through_either_gateway(fleet: Fleet) -> None:
    replicas = [r["id"] for r in _ready(fleet.a)]
    hashed = replicas[0]
    busy, prompt = _prompt("busy", hashed, replicas), _prompt("shared", hashed, replicas)
    # A slow request through a holds `hashed`, so a places the new prefix on another replica.
    held: list[httpx.Response] = []
    t = threading.Thread(target=lambda: held.append(_post(fleet.a, "/v1/completions", json={
        "model": "shared", "prompt": busy, "sleep": 6})))
    t.start()
    try:
        fleet.a.wait("the slow request in flight (as the gateway publishes it)", lambda: _published_load(fleet),
                     timeout=10)
        via_a = _post(fleet.a, "/v1/completions", json={"model": "shared", "prompt": prompt})
    finally:
        t.join(30)
    assert held and held[0].headers["x-ballast-replica"] == hashed
    placed = via_a.headers["x-ballast-replica"]
    assert via_a.status_code == 200 and placed != hashed
    # Idle b would pick `hashed` by itself; it sends the prefix where a put it.
    via_b = _post(fleet.b, "/v1/completions", json={"model": "shared", "prompt": prompt})
    assert via_b.status_code == 200 and via_b.headers["x-ballast-replica"] == placed


def test_load_sent_only_through_the_other_platform_scales_the_leaders_deployment(fleet: Fleet) -> None:
    assert leaders(fleet.a)[-1]["data"]["holder"].split("-")[-2] == str(fleet.a.proc.pid)  # type: ignore[union-attr]
    stop = threading.Event()
    errors: list[str] = []

    def load() -> None:
        for _ in range(20):  # bounded: at most 20 slow requests per thread
            if stop.is_set():
                return
            r = _post(fleet.b, "/deployments/shared/predict", json={"sleep": 1.5})
            if r.status_code != 200:
                errors.append(r.text)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        fleet.a.wait("a third replica, started by the leader", lambda: len(fleet.a.show("shared")["replicas"]) >= 3,
                     timeout=60)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == []
    scaled = [e for e in fleet.a.api("GET", "/events?deployment=shared")["data"] if e["kind"] == "autoscale"]
    assert scaled, "no scaling event"


def test_redis_down_fails_no_request_and_limits_fall_back_to_each_gateway_then_shared_again(fleet: Fleet) -> None:
    logged = {p: len(p.output()) for p in (fleet.a, fleet.b)}
    fleet.redis.stop()
    ok = [_post(p, "/deployments/shared/predict", json={}).status_code for p in (fleet.a, fleet.b) * 5]
    assert ok == [200] * 10
    for p in (fleet.a, fleet.b):
        p.wait("shared state marked down", lambda p=p: _metric(p, "ballast_gateway_shared_state_up") == 0, timeout=10)
    answers = _alternating(fleet, _key(fleet, rpm=3), 10)
    assert [r.status_code for r in answers].count(200) == 6  # each gateway's own bucket of 3
    assert (_metric(fleet.a, "ballast_gateway_shared_state_fallbacks_total") or 0) >= 5
    for p in (fleet.a, fleet.b):
        assert p.output()[logged[p]:].count("does not answer") == 1, "logged once per outage"

    fleet.redis.start()
    for p in (fleet.a, fleet.b):
        p.wait("shared state back", lambda p=p: _metric(p, "ballast_gateway_shared_state_up") == 1, timeout=20)
    answers = _alternating(fleet, _key(fleet, rpm=3), 10)
    assert [r.status_code for r in answers].count(200) == 3
