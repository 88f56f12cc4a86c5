"""The gateway end to end: a real `ballast up`, real replica processes (tiny Llama on the native engine and
Python models), the official openai client. Routes, errors, keys, limits, metering across a restart,
prefix-aware routing, failover on kill -9, and autoscaling 0 -> 1 -> N -> 0.

The tests in this module share one platform and run in file order; the last one restarts it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import write_package
from tests.control.platform import Platform, kill_leftovers

pytest.importorskip("ballast.engine", reason="the native engine is not built")

SYSTEM = ("You are a careful assistant for a shipping company. Answer briefly, cite the policy section, and never "
          "invent tracking numbers. Policies: returns within thirty days, refunds to the original card. ") * 2

WORK_MODEL = """
import os
import time


class Model:
    def predict(self, inputs):
        if isinstance(inputs, dict) and "mark" in inputs:  # a test learns which replica holds this request
            with open(inputs["mark"], "a") as f:
                f.write(f"{os.getpid()}\\n")
        time.sleep(float(inputs.get("sleep", 0)) if isinstance(inputs, dict) else 0)
        return {"echo": inputs, "pid": os.getpid()}

    def embeddings(self, request):
        texts = request["input"] if isinstance(request["input"], list) else [request["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [float(len(t)), float(sum(map(ord, t)) % 97), 1.0]}
                for i, t in enumerate(texts)]
        n = sum(len(t.split()) for t in texts)
        return {"object": "list", "data": data, "model": "work", "usage": {"prompt_tokens": n, "total_tokens": n}}
"""


@pytest.fixture(scope="module")
def plat(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    root = tmp_path_factory.mktemp("gw")
    p = Platform(root / "home").start()
    pids: list[int] = []
    try:
        chat = write_package(root / "chat", f"""
            name: chat
            engine:
              kind: native
              checkpoint: {tiny_checkpoint}
              max_model_len: 512
              max_num_seqs: 16
              max_num_batched_tokens: 512
              kv_cache_memory: 32Mi
            autoscaling: {{min_replicas: 2, max_replicas: 2}}
            """)
        work = write_package(root / "work", """
            name: work
            runtime: {predict_concurrency: 16}
            autoscaling: {min_replicas: 2, max_replicas: 2}
            """, WORK_MODEL)
        for pkg in (chat, work):
            p.api("POST", "/deployments", expect=201, json={"path": str(pkg)})
        for name in ("chat", "work"):
            p.wait_serving(name, 1, timeout=180)
            p.wait(f"2 ready replicas of {name}", lambda n=name: _ready(p, n) == 2, timeout=180)
        ROOTS[id(p)] = root
        yield p
    finally:
        pids = p.replica_pids() if p.proc and p.proc.poll() is None else []
        p.stop()
        kill_leftovers(pids)


ROOTS: dict[int, Path] = {}


def _root(p: Platform) -> Path:
    return ROOTS[id(p)]


def _ready(p: Platform, name: str) -> int:
    return sum(r["state"] == "ready" for r in p.show(name)["replicas"])


def _client(p: Platform, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=p.url + "/v1", api_key=key or p.key, max_retries=0, timeout=60)


def _post(p: Platform, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or p.key}"} if key != "" else {}
    return httpx.post(p.url + path, headers={**headers, **kw.pop("headers", {})}, timeout=60, **kw)


def _new_key(p: Platform, **body: Any) -> dict[str, Any]:
    return p.api("POST", "/keys", expect=201, json=body)


def _assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers.get("x-request-id")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code, err
    return err


def _metric(text: str, series: str) -> float:
    """Sum of the samples of a metric name (any labels), or the one sample of `name{labels}`."""
    pattern = re.escape(series) + ("" if "{" in series else r"(?:\{[^}]*\})?") + r" ([0-9.e+-]+)$"
    return sum(float(m.group(1)) for m in re.finditer("^" + pattern, text, re.M))


MSGS = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where is my parcel?"}]


# ---- routes ------------------------------------------------------------------------------------------
def test_every_route_through_the_openai_client(plat: Platform) -> None:
    c = _client(plat)
    ids = {m.id for m in c.models.list().data}
    assert {"chat", "work"} <= ids

    r = c.chat.completions.create(model="chat", messages=MSGS, max_tokens=8, temperature=0)
    assert r.choices[0].message.content is not None and r.usage and r.usage.completion_tokens >= 1

    chunks = list(c.chat.completions.create(model="chat", messages=MSGS, max_tokens=8, temperature=0, stream=True))
    # The gateway asks the replica for usage (to meter it) but the client did not: no choice-less chunk.
    assert chunks and all(ch.choices for ch in chunks)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason is not None

    with_usage = list(c.chat.completions.create(model="chat", messages=MSGS, max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == r.usage.completion_tokens

    comp = c.completions.create(model="chat@production", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert comp.choices[0].text is not None and comp.usage.completion_tokens >= 1
    pinned = c.chat.completions.create(model="chat:1", messages=MSGS, max_tokens=8, temperature=0)
    assert pinned.choices[0].message.content == r.choices[0].message.content

    emb = c.embeddings.create(model="work", input=["hello world", "ab"])
    assert [len(d.embedding) for d in emb.data] == [3, 3]

    for path in ("/deployments/work/predict", "/deployments/work/environments/production/predict",
                 "/deployments/work/versions/1/predict"):
        resp = _post(plat, path, json={"x": 1})
        assert resp.status_code == 200, resp.text
        assert resp.json()["echo"] == {"x": 1} and resp.headers["x-request-id"]


# ---- errors ------------------------------------------------------------------------------------------
def test_each_error_status(plat: Platform) -> None:
    body = {"model": "chat", "messages": MSGS, "max_tokens": 4}
    _assert_error(_post(plat, "/v1/chat/completions", key="", json=body), 401, "missing_api_key")
    _assert_error(_post(plat, "/v1/chat/completions", key="bk_nope", json=body), 401, "invalid_api_key")
    for header in ("Api-Key", "x-api-key"):  # the same headers as the REST API
        r = httpx.post(plat.url + "/v1/chat/completions", headers={header: plat.key or ""}, json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.get(plat.url + "/api/v1/deployments", headers={header: plat.key or ""}).status_code == 200

    metrics_key = _new_key(plat, scopes=["metrics"])["key"]
    _assert_error(_post(plat, "/v1/chat/completions", key=metrics_key, json=body), 403, "insufficient_scope")
    assert httpx.get(plat.url + "/metrics", headers={"Authorization": f"Bearer {metrics_key}"}).status_code == 200
    work_only = _new_key(plat, scopes=["inference"], deployments=["work"])["key"]
    _assert_error(httpx.get(plat.url + "/metrics", headers={"Authorization": f"Bearer {work_only}"}), 403)
    _assert_error(_post(plat, "/v1/chat/completions", key=work_only, json=body), 403, "deployment_not_allowed")
    assert {m.id for m in _client(plat, work_only).models.list().data} == {"work"}

    with pytest.raises(openai.NotFoundError):
        _client(plat).chat.completions.create(model="nope", messages=MSGS)
    _assert_error(_post(plat, "/v1/chat/completions", json={**body, "model": "chat@nowhere"}), 404, "model_not_found")
    _assert_error(_post(plat, "/v1/chat/completions", json={**body, "model": "chat:99"}), 404, "model_not_found")
    _assert_error(_post(plat, "/v1/chat/completions", content=b"{not json"), 400, "invalid_json")
    _assert_error(_post(plat, "/v1/chat/completions", json={"messages": MSGS}), 400, "missing_model")
    # The replica's own validation comes back unchanged.
    err = _assert_error(_post(plat, "/v1/chat/completions", json={**body, "temperature": -3}), 400)
    assert err["param"] == "temperature"
    _assert_error(_post(plat, "/v1/chat/completions", content=b"x" * (32 * 2**20 + 1)), 413, "request_too_large")


def test_no_replica_within_the_wait_gives_503(plat: Platform) -> None:
    broken = write_package(_root(plat) / "broken", """
        name: broken
        routing: {max_wait_s: 1}
        autoscaling: {min_replicas: 0, max_replicas: 1}
        """, "class Model:\n    def load(self):\n        raise RuntimeError('no weights')\n"
                           "    def predict(self, x):\n        return x\n")
    plat.api("POST", "/deployments", expect=201, json={"path": str(broken)})
    try:
        r = _post(plat, "/deployments/broken/versions/1/predict", json={})
        _assert_error(r, 503, "no_replica_available")
        assert int(r.headers["retry-after"]) >= 1
    finally:
        plat.api("DELETE", "/deployments/broken")


# ---- keys and limits --------------------------------------------------------------------------------
def test_keys_cli_and_revocation_within_a_second(plat: Platform) -> None:
    out = plat.cli("keys", "create", "--scope", "inference", "--name", "ci", "--json")
    created = json.loads(out.stdout)
    secret = created["key"]
    assert secret.startswith("bk_") and created["prefix"] == secret[:10]
    assert _post(plat, "/deployments/work/predict", key=secret, json={}).status_code == 200
    listed = plat.cli("keys", "list").stdout
    assert created["id"] in listed and secret not in listed

    plat.cli("keys", "revoke", created["id"])
    revoked_at = time.monotonic()
    while True:  # refused within a second of the revocation
        r = _post(plat, "/deployments/work/predict", key=secret, json={})
        if r.status_code == 401:
            break
        assert time.monotonic() - revoked_at < 1.0, "revoked key still accepted after 1 s"
        time.sleep(0.05)
    assert "revoked" in r.json()["error"]["message"]
    assert created["id"] in plat.cli("keys", "list", "--all").stdout


def test_rate_limits_and_budgets_give_429(plat: Platform) -> None:
    rpm = _new_key(plat, scopes=["inference"], rpm=3)["key"]
    codes = [_post(plat, "/deployments/work/predict", key=rpm, json={}).status_code for _ in range(4)]
    assert codes[:3] == [200, 200, 200]
    r = _post(plat, "/deployments/work/predict", key=rpm, json={})
    _assert_error(r, 429, "rate_limit_requests")
    assert int(r.headers["retry-after"]) >= 1

    body = {"model": "chat", "messages": MSGS, "max_tokens": 8, "temperature": 0}
    budget = _new_key(plat, scopes=["inference"], token_budget=30, per="day")["key"]
    first = _post(plat, "/v1/chat/completions", key=budget, json=body)
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] > 30
    _assert_error(_post(plat, "/v1/chat/completions", key=budget, json=body), 429, "budget_exceeded")

    tpm = _new_key(plat, scopes=["inference"], tpm=40)["key"]
    assert _post(plat, "/v1/chat/completions", key=tpm, json=body).status_code == 200
    r = _post(plat, "/v1/chat/completions", key=tpm, json=body)
    _assert_error(r, 429, "rate_limit_tokens")
    assert int(r.headers["retry-after"]) >= 1


# ---- routing ----------------------------------------------------------------------------------------
def _replica_metrics(plat: Platform, name: str) -> dict[str, str]:
    reps = [r for r in plat.show(name)["replicas"] if r["state"] == "ready"]
    return {r["id"]: httpx.get(r["url"] + "/metrics", timeout=10).text for r in reps}


def test_prefix_aware_routing_keeps_a_conversation_on_one_replica(plat: Platform) -> None:
    c = _client(plat)
    before = _replica_metrics(plat, "chat")
    assert len(before) == 2
    history: list[dict[str, str]] = [{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": "I want to return a kettle."}]
    for turn in range(6):  # an agent's growing conversation
        r = c.chat.completions.create(model="chat", messages=history, max_tokens=6, temperature=0)
        history += [{"role": "assistant", "content": r.choices[0].message.content or "ok"},
                    {"role": "user", "content": f"And question number {turn}?"}]
    after = _replica_metrics(plat, "chat")
    served = {rid: _metric(after[rid], "ballast_llm_prompt_tokens_total")
              - _metric(before[rid], "ballast_llm_prompt_tokens_total") for rid in before}
    hits = {rid: _metric(after[rid], "ballast_llm_cached_prompt_tokens_total")
            - _metric(before[rid], "ballast_llm_cached_prompt_tokens_total") for rid in before}
    busy = [rid for rid, n in served.items() if n > 0]
    assert len(busy) == 1, f"the conversation was spread over replicas: {served}"
    assert hits[busy[0]] >= 5 * 32, hits  # every later turn found the earlier ones in the KV cache

    # Session affinity: unrelated prompts with one x-ballast-session go to one replica too.
    before = _replica_metrics(plat, "chat")
    for i in range(6):
        c.chat.completions.create(model="chat", messages=[{"role": "user", "content": f"topic {i} " * (i + 1)}],
                                  max_tokens=2, extra_headers={"x-ballast-session": "user-42"})
    after = _replica_metrics(plat, "chat")
    served = {rid: _metric(after[rid], "ballast_llm_prompt_tokens_total")
              - _metric(before[rid], "ballast_llm_prompt_tokens_total") for rid in before}
    assert sum(n > 0 for n in served.values()) == 1, served


# ---- failover ---------------------------------------------------------------------------------------
def test_kill_9_of_a_replica_under_load_fails_no_request(plat: Platform, tmp_path: Path) -> None:
    reps = [r for r in plat.show("work")["replicas"] if r["state"] == "ready"]
    assert len(reps) == 2
    statuses: list[int] = []
    lock = threading.Lock()
    sent = threading.Semaphore(0)
    mark = tmp_path / "held-by"

    def one(i: int, **extra: object) -> None:
        r = _post(plat, "/deployments/work/predict", json={"i": i, "sleep": 0.05, **extra})
        with lock:
            statuses.append(r.status_code)
        sent.release()

    with ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(one, i) for i in range(240)]
        for _ in range(60):
            assert sent.acquire(timeout=60)
        # The victim is the replica holding a slow request right now (the model writes its pid when the
        # request starts), so the kill is certain to catch a request in flight, whatever routing did before.
        futures.append(pool.submit(one, 240, sleep=3.0, mark=str(mark)))
        deadline = time.monotonic() + 60
        while not (mark.exists() and mark.read_text().endswith("\n")) and time.monotonic() < deadline:
            time.sleep(0.01)
        victim = next(r for r in reps if r["pid"] == int(mark.read_text().split()[0]))
        os.kill(victim["pid"], signal.SIGKILL)
        for f in futures:
            f.result(timeout=120)
    assert len(statuses) == 241
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    text = httpx.get(plat.url + "/metrics", headers={"Authorization": f"Bearer {plat.key}"}).text
    # Requests in flight on the victim were retried elsewhere (or it was ejected on a refused connection).
    assert _metric(text, "ballast_gateway_retries_total") + _metric(text, "ballast_gateway_ejections_total") >= 1
    # The reconciler replaces the dead replica.
    plat.wait("work back at 2 ready replicas", lambda: _ready(plat, "work") == 2
              and victim["pid"] not in {r["pid"] for r in plat.show("work")["replicas"] if r["state"] == "ready"},
              timeout=120)


# ---- autoscaling ------------------------------------------------------------------------------------
def test_scale_to_zero_hold_and_serve_then_up_to_n_and_back_to_zero(plat: Platform) -> None:
    lazy = write_package(_root(plat) / "lazy", """
        name: lazy
        runtime: {predict_concurrency: 16}
        autoscaling:
          min_replicas: 0
          max_replicas: 3
          concurrency_target: 1
          target_utilization: 1.0
          window_s: 2
          scale_down_delay_s: 2
        """, WORK_MODEL)
    plat.api("POST", "/deployments", expect=201, json={"path": str(lazy)})
    try:
        plat.wait_serving("lazy", 1, timeout=120)
        # Idle: down to zero replicas.
        plat.wait("lazy at zero", lambda: not plat.show("lazy")["replicas"], timeout=60)
        assert plat.show("lazy")["versions"][0]["desired"] == 0

        # 0 -> 1: the request is held while a replica cold-starts, then served.
        r = _post(plat, "/deployments/lazy/predict", json={"wake": 1})
        assert r.status_code == 200, r.text
        v = plat.show("lazy")["versions"][0]
        assert v["last_cold_start_s"] is not None and v["replicas"]["ready"] >= 1
        text = httpx.get(plat.url + "/metrics", headers={"Authorization": f"Bearer {plat.key}"}).text
        assert _metric(text, 'ballast_cold_starts_total{deployment="lazy",version="1"}') >= 2
        assert _metric(text, 'ballast_gateway_cold_start_wait_seconds_count{deployment="lazy"}') >= 1
        assert "COLD START" in plat.cli("show", "lazy").stdout

        # 1 -> N under load: six requests in flight all the time.
        stop = threading.Event()
        codes: list[int] = []

        def load() -> None:
            for _ in range(200):
                if stop.is_set():
                    return
                codes.append(_post(plat, "/deployments/lazy/predict", json={"sleep": 0.3}).status_code)

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(load) for _ in range(6)]
            try:
                plat.wait("lazy at 3 ready replicas", lambda: _ready(plat, "lazy") == 3, timeout=90)
            finally:
                stop.set()
                for f in futures:
                    f.result(timeout=120)
        assert codes and set(codes) == {200}

        # N -> 0 after the load stops.
        plat.wait("lazy back at zero", lambda: not plat.show("lazy")["replicas"], timeout=60)
        kinds = [e["message"] for e in plat.api("GET", "/deployments/lazy/events?limit=200")["data"]
                 if e["kind"] == "autoscale"]
        assert any("-> 3" in m for m in kinds) and any("-> 0" in m for m in kinds), kinds
    finally:
        plat.api("DELETE", "/deployments/lazy")


# ---- metering (restarts the platform: keep last) ----------------------------------------------------
def test_usage_is_exact_after_a_restart(plat: Platform) -> None:
    k = _new_key(plat, scopes=["inference"], name="metered")
    c = _client(plat, k["key"])
    prompt = completion = 0
    for i in range(4):
        r = c.chat.completions.create(model="chat", messages=[*MSGS[:1], {"role": "user", "content": f"q{i}"}],
                                      max_tokens=6, temperature=0)
        prompt += r.usage.prompt_tokens
        completion += r.usage.completion_tokens
    # A stream whose client did not ask for usage is metered too (same tokens as the same request unstreamed).
    ref = c.chat.completions.create(model="chat", messages=MSGS, max_tokens=7, temperature=0)
    streamed = list(c.chat.completions.create(model="chat", messages=MSGS, max_tokens=7, temperature=0, stream=True))
    assert streamed
    prompt += 2 * ref.usage.prompt_tokens
    completion += 2 * ref.usage.completion_tokens
    # The Responses API passes through and is metered, whole and streamed (usage in its final event).
    rref = c.responses.create(model="chat", input="q", max_output_tokens=5, temperature=0)
    assert list(c.responses.create(model="chat", input="q", max_output_tokens=5, temperature=0, stream=True))
    prompt += 2 * rref.usage.input_tokens
    completion += 2 * rref.usage.output_tokens
    for _ in range(3):
        assert _post(plat, "/deployments/work/predict", key=k["key"], json={}).status_code == 200
    bad = _post(plat, "/v1/chat/completions", key=k["key"], json={"model": "chat", "messages": MSGS,
                                                                   "max_tokens": 100000})
    assert bad.status_code == 400
    # Stop at once (well inside the meter's one-second flush interval): shutdown must flush.
    assert plat.stop() == 0
    again = Platform(plat.home, port=plat.port).start()
    plat.proc = again.proc
    rows = json.loads(again.cli("usage", "--key", k["id"], "--group", "key", "--json").stdout)
    assert len(rows) == 1
    row = rows[0]
    assert row["requests"] == 4 + 2 + 2 + 3 + 1
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
    assert row["errors"] == 1
    rows = again.api("GET", f"/usage?key={k['id']}&group=deployment")["data"]
    by_dep = {r["deployment"]: r["requests"] for r in rows}
    assert by_dep == {"chat": 9, "work": 3}
