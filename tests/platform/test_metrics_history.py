"""Metrics history end to end: a real `ballast up` sampling every second, real replicas (a Python model and a tiny
LLM on the native engine), real traffic through the gateway, read back through the REST API; and the store's
bounds and rollups on real SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from ballast.control.metrics_history import COARSE_KEEP_S, COARSE_S, FINE_KEEP_S, MetricsHistory, Window, quantile
from ballast.store import Deployment, open_store, utcnow
from tests.conftest import write_package
from tests.control.platform import Platform, kill_leftovers

FLAKY_MODEL = """
import logging


class Model:
    def predict(self, inputs):
        logging.getLogger("work").info("handled %s", inputs)
        if inputs.get("fail"):
            raise ValueError("asked to fail")
        return {"ok": True}
"""


@pytest.fixture(scope="module")
def plat(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    root = tmp_path_factory.mktemp("metrics")
    p = Platform(root / "home")
    p.env["BALLAST_METRICS_INTERVAL_S"] = "1"
    p.start()
    pids: list[int] = []
    try:
        work = write_package(root / "work", "name: work\n", FLAKY_MODEL)
        chat = write_package(root / "chat", f"""
            name: chat
            engine:
              kind: native
              checkpoint: {tiny_checkpoint}
              max_model_len: 256
              max_num_seqs: 4
              max_num_batched_tokens: 256
              kv_cache_memory: 16Mi
            """)
        for pkg in (work, chat):
            p.api("POST", "/deployments", expect=201, json={"path": str(pkg)})
        for name in ("work", "chat"):
            p.wait_serving(name, 1, timeout=180)
        yield p
    finally:
        pids = p.replica_pids() if p.proc and p.proc.poll() is None else []
        p.stop()
        kill_leftovers(pids)


def _metrics(p: Platform, name: str, range_: str = "15m") -> dict[str, Any]:
    return p.api("GET", f"/deployments/{name}/metrics", params={"range": range_})


def _total(m: dict[str, Any], series: str) -> float:
    """Sum of a rate series times the bucket width: the count it stands for."""
    return sum(v for v in m["series"][series] if v is not None) * m["resolution_s"]


def test_requests_errors_and_latency_of_real_traffic(plat: Platform) -> None:
    h = {"Authorization": f"Bearer {plat.key}"}
    before = _metrics(plat, "work")
    for i in range(12):
        r = httpx.post(plat.url + "/deployments/work/predict", json={"i": i}, headers=h, timeout=30)
        assert r.status_code == 200, r.text
    for _ in range(3):
        r = httpx.post(plat.url + "/deployments/work/predict", json={"fail": True}, headers=h, timeout=30)
        assert r.status_code == 500, r.text
    r = httpx.post(plat.url + "/deployments/work/predict", content=b"{", headers=h, timeout=30)
    assert r.status_code == 400

    def counted() -> dict[str, Any] | None:
        m = _metrics(plat, "work")
        return m if _total(m, "requests_2xx") - _total(before, "requests_2xx") >= 12 and \
            _total(m, "requests_5xx") - _total(before, "requests_5xx") >= 3 else None

    m = plat.wait("12 ok and 3 failed requests in the history", counted, timeout=30, every=0.5)
    assert round(_total(m, "requests_2xx") - _total(before, "requests_2xx")) == 12
    assert round(_total(m, "requests_5xx") - _total(before, "requests_5xx")) == 3
    assert m["resolution_s"] == 1 and m["t"] == sorted(set(m["t"]))
    rates = [v for v in m["series"]["error_rate"] if v]
    assert rates and all(0 < v <= 1 for v in rates)
    p50 = [v for v in m["series"]["latency_p50"] if v is not None]
    p99 = [v for v in m["series"]["latency_p99"] if v is not None]
    assert p50 and p99 and all(0 < a <= b for a, b in zip(p50, p99, strict=True))
    assert m["series"]["replicas_ready"][-1] == 1 and m["series"]["replicas_desired"][-1] >= 1
    assert m["units"]["latency_p99"] == "s"


def test_tokens_ttft_and_kv_cache_of_an_llm(plat: Platform) -> None:
    h = {"Authorization": f"Bearer {plat.key}"}
    for i in range(3):
        body = {"model": "chat", "messages": [{"role": "user", "content": f"count to {i}"}], "max_tokens": 6,
                "stream": True, "temperature": 0}
        with httpx.stream("POST", plat.url + "/v1/chat/completions", json=body, headers=h, timeout=60) as r:
            assert r.status_code == 200
            r.read()

    def measured() -> dict[str, Any] | None:
        m = _metrics(plat, "chat")
        s = m["series"]
        ok = (_total(m, "tokens_in") > 0 and _total(m, "tokens_out") >= 3 and any(v for v in s["ttft_p50"])
              and any(v is not None for v in s["kv_cache_usage"]) and any(v is not None for v in s["itl_p99"]))
        return m if ok else None

    m = plat.wait("tokens, TTFT and KV-cache use in the history", measured, timeout=30, every=0.5)
    assert all(v is None or 0 <= v <= 1 for v in m["series"]["kv_cache_usage"])
    assert all(v is None or 0 <= v <= 1 for v in m["series"]["prefix_cache_hit_rate"])


def test_longer_ranges_read_the_rollup(plat: Platform) -> None:
    m = plat.wait("a 5-minute point", lambda: (lambda m: m if m["t"] else None)(_metrics(plat, "work", "7d")),
                  timeout=10)
    assert m["resolution_s"] == COARSE_S and all(t % COARSE_S == 0 for t in m["t"])
    assert any(v for v in m["series"]["requests_2xx"])
    assert _metrics(plat, "work", "24h")["resolution_s"] == COARSE_S
    assert _metrics(plat, "work", "1h")["resolution_s"] == 1


def test_errors_of_the_route(plat: Platform) -> None:
    r = httpx.get(plat.url + "/api/v1/deployments/work/metrics", params={"range": "2d"},
                  headers={"Authorization": f"Bearer {plat.key}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "range" and r.headers["x-request-id"]
    r = httpx.get(plat.url + "/api/v1/deployments/nope/metrics", headers={"Authorization": f"Bearer {plat.key}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "deployment_not_found"
    assert httpx.get(plat.url + "/api/v1/deployments/work/metrics").status_code == 401
    key = plat.api("POST", "/keys", expect=201, json={"scopes": ["inference"]})["key"]
    r = httpx.get(plat.url + "/api/v1/deployments/work/metrics", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 403


# ---- the store: bounded whatever the traffic, rollups from summed deltas -----------------------------------
def test_the_table_stays_bounded_and_prunes_by_age(database_url: str) -> None:
    _engine, sessions = open_store(database_url)
    with sessions() as s, s.begin():
        s.add(Deployment(name="work", created_at=utcnow()))
    history = MetricsHistory(sessions, fine_s=10)
    now = 10_000_000
    point = Window(seconds=10, counters={"requests_2xx": 50.0}).values()
    for ts in range(now - 2 * FINE_KEEP_S, now, 10):  # two days of 10 s buckets
        if ts % 3600 == 0 or ts > now - 600:
            history.write(10, ts, {"work": point, "gone": point})
    for _ in range(3):  # the same bucket again: replaced, not added
        history.write(10, now - 10, {"work": point})
    history.write(COARSE_S, now - COARSE_KEEP_S - COARSE_S, {"work": point})
    history.write(COARSE_S, now - COARSE_S, {"work": point})
    history.prune(now, ["work", "gone"], orphans=True)
    rows = history.rows()
    fine = history.query("work", "1h", now)
    assert all(t >= now - 3600 for t in fine["t"]) and len(fine["t"]) == len(set(fine["t"]))
    assert fine["series"]["requests_2xx"][-1] == 5.0
    assert history.query("work", "7d", now)["t"] == [now - COARSE_S]
    kept = [ts for ts in range(now - 2 * FINE_KEEP_S, now, 10) if ts % 3600 == 0 or ts > now - 600]
    kept = [ts for ts in kept if ts >= now - FINE_KEEP_S]
    assert rows == len(kept) + 1  # the old and the deleted deployment's rows went
    assert fine["t"] == [ts for ts in kept if ts >= now - 3600]


def test_percentiles_of_summed_buckets() -> None:
    assert quantile(0.5, {}) is None
    assert quantile(0.5, {0.1: 10.0, 0.2: 10.0, float("inf"): 0.0}) == pytest.approx(0.1)
    assert quantile(0.99, {0.1: 0.0, 1.0: 0.0, float("inf"): 5.0}) == 1.0  # the highest finite bound
    a = Window(seconds=10, histograms={"latency": {0.1: 9.0, 1.0: 0.0, float("inf"): 0.0}})
    b = Window(seconds=10, histograms={"latency": {0.1: 0.0, 1.0: 1.0, float("inf"): 0.0}})
    a.add(b)
    v = a.values()
    assert 0.1 < v["latency_p99"] <= 1.0 and v["latency_p50"] < 0.1 and v["error_rate"] is None
