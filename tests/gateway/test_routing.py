"""Routing policies: P2C least outstanding, prefix affinity with bounded load, exact canary splits."""

from __future__ import annotations

import random
import time
from collections import Counter

from ballast.gateway.auth import api_key_from_headers
from ballast.gateway.routing import Endpoint, Router, WeightedSplit, prefix_key


def _eps(n: int) -> list[Endpoint]:
    return [Endpoint(replica_id=f"r{i}", url=f"http://127.0.0.1:{9000 + i}", version=1) for i in range(n)]


def test_p2c_prefers_less_loaded():
    eps = _eps(2)
    eps[0].outstanding = 5
    router = Router(rng=random.Random(0))
    assert all(router.choose(eps) is eps[1] for _ in range(20))


def test_replicas_of_the_platforms_own_pool_first_then_spill_over_and_fail_over():
    eps = _eps(4)
    for e in eps[2:]:
        e.meta["remote"] = True  # placed in another pool (another cluster or region)
    router = Router(rng=random.Random(0), load_slack=4)
    assert {router.choose(eps).replica_id for _ in range(50)} == {"r0", "r1"}
    eps[0].outstanding = eps[1].outstanding = 5  # the own pool is busier than slack allows: all share
    picks = Counter(router.choose(eps).replica_id for _ in range(60))
    assert picks["r2"] + picks["r3"] > 30 and set(picks) == {"r0", "r1", "r2", "r3"}
    eps[2].outstanding = eps[3].outstanding = 2
    assert {router.choose(eps).replica_id for _ in range(50)} == {"r0", "r1"}  # within slack again
    # The own pool's replicas refuse (a retry excludes them) or are ejected: the other pool serves.
    assert router.choose(eps, exclude={"r0", "r1"}).replica_id in {"r2", "r3"}
    eps[0].ejected_until = eps[1].ejected_until = time.monotonic() + 60
    assert {router.choose(eps).replica_id for _ in range(20)} == {"r2", "r3"}


def test_ejected_and_excluded_replicas_are_skipped():
    eps = _eps(3)
    eps[0].ejected_until = time.monotonic() + 60
    router = Router(rng=random.Random(1))
    picks = {router.choose(eps, exclude={"r1"}).replica_id for _ in range(20)}
    assert picks == {"r2"}
    # All ejected: still try one rather than fail outright.
    for e in eps:
        e.ejected_until = time.monotonic() + 60
    assert router.choose(eps) is not None
    assert router.choose(eps, exclude={"r0", "r1", "r2"}) is None


def test_prefix_affinity_is_stable_and_bounded():
    eps = _eps(4)
    router = Router(load_epsilon=0.5, rng=random.Random(2))
    conv = {"messages": [{"role": "system", "content": "S" * 3000}, {"role": "user", "content": "conv-7 hi"}]}
    key = prefix_key(conv, None)
    first = router.choose(eps, key=key)
    # Later turns of the same conversation share system + first user message: same replica.
    later = {**conv, "messages": [*conv["messages"], {"role": "assistant", "content": "x"},
                                  {"role": "user", "content": "more"}]}
    assert prefix_key(later, None) == key
    assert all(router.choose(eps, key=key) is first for _ in range(10))
    # Different conversations spread over replicas.
    owners = Counter(
        router.choose(eps, key=prefix_key({"messages": [{"role": "user", "content": f"c{i}"}]}, None)).replica_id
        for i in range(200)
    )
    assert len(owners) == 4 and min(owners.values()) > 20
    # Light load never breaks affinity (a miss costs a whole prefill) ...
    first.outstanding = 4
    assert router.choose(eps, key=key) is first
    # ... but a hot prefix spills over when its replica is far above the mean.
    first.outstanding = 10
    assert router.choose(eps, key=key) is not first
    # A prefix cached nowhere yet goes to the least loaded replica, and stays there once it has been sent.
    for i, e in enumerate(eps):
        e.outstanding = 0 if i == 2 else 3
    fresh = prefix_key({"messages": [{"role": "user", "content": "a brand new conversation"}]}, None)
    assert router.choose(eps, key=fresh) is eps[2]
    eps[2].outstanding = 5
    assert router.choose(eps, key=fresh) is eps[2]
    # A long shared system prompt does not hide the first user message.
    long_system = {"role": "system", "content": "tools: " + "x" * 10_000}
    keys = {prefix_key({"messages": [long_system, {"role": "user", "content": f"user {i}"}]}, None) for i in range(3)}
    assert len(keys) == 3
    # A session header overrides the prompt.
    assert prefix_key(conv, "sess-1") == b"s:sess-1"


def test_weighted_split_is_exact():
    split = WeightedSplit([(1, 90), (2, 10)])
    picks = [split.next() for _ in range(1000)]
    assert picks.count(2) == 100
    # Evenly spread: every window of 100 has exactly 10 canary picks.
    assert all(picks[i : i + 100].count(2) == 10 for i in range(0, 1000, 100))
    assert WeightedSplit([(3, 0), (4, 100)]).next() == 4


def test_one_key_header_parser():
    import httpx

    for h in ({"Authorization": "Bearer bk_1"}, {"authorization": "bearer  bk_1 "}, {"Api-Key": "bk_1"},
              {"X-API-Key": "bk_1"}):
        assert api_key_from_headers(httpx.Headers(h)) == "bk_1", h
    assert api_key_from_headers(httpx.Headers({"Authorization": "Basic x"})) is None
    assert api_key_from_headers(httpx.Headers({})) is None
