"""Async requests end to end: a real `ballast up`, real replicas, a real loopback webhook receiver that verifies
every delivery with the `standardwebhooks` package. Happy path, options and targets refused, queue limit,
cancel, expiry, webhook retries, and kill -9 of the platform mid-queue.

The tests share one platform and run in file order; the last one kills and restarts it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import write_package
from tests.control.platform import Platform, kill_leftovers
from tests.gateway.webhook_receiver import Receiver

MODEL = """
import os
import time


class Model:
    def predict(self, inputs):
        if isinstance(inputs, dict) and inputs.get("mark"):
            open(inputs["mark"], "w").close()  # the test's sign that this request is running
        time.sleep(float(inputs.get("sleep", 0)) if isinstance(inputs, dict) else 0)
        return {"echo": inputs, "pid": os.getpid()}

    async def chat_completions(self, request):
        from ballast.runtime.host import request_priority  # the x-ballast-priority the replica got

        text = request["messages"][-1]["content"]
        from ballast.observe import current_request_id  # the x-request-id the replica got

        return {"id": f"chatcmpl-{current_request_id()}", "object": "chat.completion", "created": 0,
                "model": request["model"],
                "system_fingerprint": f"priority-{request_priority.get()}",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text.upper()},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
"""


@pytest.fixture(scope="module")
def plat(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("async")
    p = Platform(root / "home")
    p.env["BALLAST_WEBHOOK_ALLOW"] = "127.0.0.1/32"
    p.start()
    try:
        work = write_package(root / "work", """
            name: work
            runtime: {predict_concurrency: 4}
            autoscaling: {min_replicas: 1, max_replicas: 1, concurrency_target: 2}
            async: {max_queue: 100, max_concurrency: 2, result_ttl_s: 600}
            """, MODEL)
        slow = write_package(root / "slow", """
            name: slow
            autoscaling: {min_replicas: 1, max_replicas: 1}
            async: {max_queue: 3, max_concurrency: 1}
            """, MODEL)
        tight = write_package(root / "tight", """
            name: tight
            runtime: {predict_concurrency: 1, max_queue: 1}
            autoscaling: {min_replicas: 1, max_replicas: 1, concurrency_target: 1}
            async: {max_queue: 10, max_concurrency: 4}
            """, MODEL)
        for pkg in (work, slow, tight):
            p.api("POST", "/deployments", expect=201, json={"path": str(pkg)})
        for name in ("work", "slow", "tight"):
            p.wait_serving(name, 1, timeout=120)
        p.secret = p.api("POST", "/webhook_secret", expect=201)["secret"]  # type: ignore[attr-defined]
        yield p
    finally:
        pids = p.replica_pids() if p.proc and p.proc.poll() is None else []
        p.stop()
        kill_leftovers(pids)


@pytest.fixture
def receiver(plat: Platform):
    r = Receiver(plat.secret)  # type: ignore[attr-defined]
    yield r
    r.close()


def _req(p: Platform, method: str, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
    return httpx.request(method, p.url + path, headers={"Authorization": f"Bearer {key or p.key}"}, timeout=30, **kw)


def _submit(p: Platform, name: str, inputs: Any, hook: str | None, key: str | None = None, **opts: Any) -> str:
    body = {"model_input": inputs, **({"webhook_endpoint": hook} if hook else {}), **opts}
    r = _req(p, "POST", f"/deployments/{name}/async_predict", key, json=body)
    assert r.status_code == 201, r.text
    return r.json()["request_id"]


def _status(p: Platform, rid: str, key: str | None = None) -> dict[str, Any]:
    r = _req(p, "GET", f"/async_requests/{rid}", key)
    assert r.status_code == 200, r.text
    return r.json()


def _wait_status(p: Platform, rid: str, want: set[str], timeout: float = 60) -> dict[str, Any]:
    return p.wait(f"{rid} in {want}", lambda: (s := _status(p, rid)) and s["status"] in want and s, timeout)


def _error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code, err
    return err


def test_happy_path_signed_webhooks_once_each(plat: Platform, receiver: Receiver) -> None:
    key = plat.api("POST", "/keys", expect=201, json={"scopes": ["inference"], "deployments": ["work"]})["key"]
    ids = [_submit(plat, "work", {"i": i}, receiver.url, key) for i in range(6)]
    got = receiver.wait_for(6)
    assert set(got) == set(ids)
    assert receiver.bad_signatures == 0
    for rid in ids:
        (payload,) = got[rid]
        assert payload["deployment"] == "work" and payload["version"] == 1 and payload["errors"] == []
        assert payload["type"] == "async_request.completed" and payload["time"]
        assert payload["data"]["echo"]["i"] == ids.index(rid)
    assert all(len(v) == 1 for v in receiver.delivered.values())  # each webhook-id once
    st = _wait_status(plat, ids[0], {"SUCCEEDED"})
    assert st["webhook"]["state"] == "delivered" and st["started_at"] and st["finished_at"]
    # result_ttl_s opted in: the output is kept for GET .../result
    r = _req(plat, "GET", f"/async_requests/{ids[0]}/result", key)
    assert r.status_code == 200 and r.json()["output"]["echo"] == {"i": 0}
    # only the key that created it (or an admin) sees it
    other = plat.api("POST", "/keys", expect=201, json={"scopes": ["inference"]})["key"]
    _error(_req(plat, "GET", f"/async_requests/{ids[0]}", other), 404, "not_found")
    assert _req(plat, "GET", f"/v1/async_requests/{ids[0]}").status_code == 200  # admin


def test_async_chat_completions(plat: Platform, receiver: Receiver) -> None:
    r = _req(plat, "POST", "/v1/async/chat/completions", json={
        "model": "work", "messages": [{"role": "user", "content": "hi"}], "webhook_endpoint": receiver.url,
        "priority": 0})
    assert r.status_code == 201, r.text
    (payload,) = receiver.wait_for(1)[r.json()["request_id"]]
    assert payload["data"]["choices"][0]["message"]["content"] == "HI"
    assert payload["data"]["system_fingerprint"] == "priority-1"  # async priority 0 runs at engine priority 1
    # Interactive: no priority header reaches the replica (the engine's 0), and a client's own is not passed on.
    direct = httpx.post(plat.url + "/v1/chat/completions", timeout=30,
                        headers={"Authorization": f"Bearer {plat.key}", "x-ballast-priority": "3"},
                        json={"model": "work", "messages": [{"role": "user", "content": "hi"}]})
    assert direct.status_code == 200 and direct.json()["system_fingerprint"] == "priority-None"
    _error(_req(plat, "POST", "/v1/async/chat/completions", json={
        "model": "work", "stream": True, "messages": [], "webhook_endpoint": receiver.url}), 400)


def test_bad_requests_are_refused_naming_the_problem(plat: Platform, receiver: Receiver) -> None:
    post = lambda body, name="work", key=None: _req(plat, "POST", f"/deployments/{name}/async_predict", key,  # noqa: E731
                                                    json=body)
    assert _error(post({"webhook_endpoint": receiver.url}), 400)["param"] == "model_input"
    assert _error(post({"model_input": 1, "webhook_endpoint": receiver.url, "priority": 3}), 400)["param"] == "priority"
    assert _error(post({"model_input": 1, "webhook_endpoint": receiver.url, "max_time_in_queue_s": 0}),
                  400)["param"] == "max_time_in_queue_s"
    assert "metadata" in _error(post({"model_input": 1, "webhook_endpoint": "http://169.254.169.254/x"}), 400,
                                "webhook_target_blocked")["message"]
    assert "private" in _error(post({"model_input": 1, "webhook_endpoint": "http://10.1.2.3/x"}), 400,
                               "webhook_target_blocked")["message"]
    _error(post({"model_input": 1, "webhook_endpoint": "ftp://example.com/x"}), 400, "invalid_webhook")
    _error(post({"model_input": 1}, name="slow"), 400)  # no webhook, no kept results: the output would be lost
    _error(post({"model_input": 1, "webhook_endpoint": receiver.url}, name="nope"), 404, "model_not_found")
    limited = plat.api("POST", "/keys", expect=201, json={"scopes": ["inference"], "deployments": ["slow"]})["key"]
    _error(post({"model_input": 1, "webhook_endpoint": receiver.url}, key=limited), 403, "deployment_not_allowed")
    metrics_only = plat.api("POST", "/keys", expect=201, json={"scopes": ["metrics"]})["key"]
    _error(post({"model_input": 1, "webhook_endpoint": receiver.url}, key=metrics_only), 403)
    r = httpx.post(plat.url + "/deployments/work/async_predict", content=b"{nope", timeout=10,
                   headers={"Authorization": f"Bearer {plat.key}"})
    _error(r, 400, "invalid_json")
    _error(_req(plat, "GET", "/async_requests/req-doesnotexist"), 404)
    body = {"model_input": 1, "webhook_endpoint": receiver.url}
    _error(_req(plat, "POST", "/deployments/work/environments/nope/async_predict", json=body), 404, "model_not_found")
    _error(_req(plat, "POST", "/deployments/work/versions/9/async_predict", json=body), 404, "model_not_found")
    paths = ["/deployments/work/environments/production/async_predict", "/deployments/work/versions/1/async_predict"]
    for path in paths:
        r = _req(plat, "POST", path, json={"model_input": {"via": path}, "webhook_endpoint": receiver.url})
        assert r.status_code == 201, r.text
    got = receiver.wait_for(2)
    assert sorted(p[0]["data"]["echo"]["via"] for p in got.values()) == sorted(paths)


def test_queue_limit_cancel_and_expiry(plat: Platform, receiver: Receiver) -> None:
    running = _submit(plat, "slow", {"sleep": 4}, receiver.url)
    _wait_status(plat, running, {"IN_PROGRESS"})
    expiring = _submit(plat, "slow", {"i": "expires"}, receiver.url, max_time_in_queue_s=1)
    canceled = _submit(plat, "slow", {"i": "canceled"}, receiver.url)
    queued = _submit(plat, "slow", {"i": "last"}, receiver.url, priority=2)
    r = _req(plat, "POST", "/deployments/slow/async_predict", json={"model_input": 1, "webhook_endpoint": receiver.url})
    _error(r, 429, "queue_full")
    assert r.headers.get("retry-after")
    r = _req(plat, "DELETE", f"/async_requests/{canceled}")
    assert r.status_code == 200 and r.json()["status"] == "CANCELED"
    _error(_req(plat, "DELETE", f"/async_requests/{canceled}"), 409, "not_cancelable")
    _error(_req(plat, "DELETE", f"/async_requests/{running}"), 409, "not_cancelable")
    assert _wait_status(plat, expiring, {"EXPIRED"})["errors"][0]["code"] == "expired"
    got = receiver.wait_for(3)
    assert set(got) == {running, expiring, queued}  # a canceled request sends no webhook
    assert got[expiring][0]["type"] == "async_request.expired" and got[expiring][0]["data"] is None
    assert _status(plat, queued)["status"] == "SUCCEEDED"


def test_concurrent_submissions_share_commits_and_the_queue_limit(plat: Platform, receiver: Receiver) -> None:
    """Submissions that arrive together are committed together (group commit): each 201 names a stored request,
    and the deployment's max_queue (3) holds exactly, whichever transaction a submission lands in."""
    running = _submit(plat, "slow", {"sleep": 3}, receiver.url)
    _wait_status(plat, running, {"IN_PROGRESS"})

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {plat.key}"}, timeout=30) as c:
            return await asyncio.gather(*(c.post(plat.url + "/deployments/slow/async_predict",
                                                 json={"model_input": {"i": i}, "webhook_endpoint": receiver.url})
                                          for i in range(24)))

    got = asyncio.run(burst())
    accepted = [r.json()["request_id"] for r in got if r.status_code == 201]
    assert len(accepted) == 3, [r.status_code for r in got]
    for r in got:
        if r.status_code != 201:
            _error(r, 429, "queue_full")
    for rid in accepted:
        assert _status(plat, rid)["status"] == "QUEUED"
        assert _req(plat, "DELETE", f"/async_requests/{rid}").status_code == 200
    _wait_status(plat, running, {"SUCCEEDED"})


def test_queued_work_leaves_the_replica_to_interactive_requests(plat: Platform, receiver: Receiver,
                                                                tmp_path: Path) -> None:
    """`tight` runs one request and queues one. While an interactive request runs, the dispatcher holds the async
    request back (no spare capacity), so a second interactive request finds the replica's queue free: 200, not
    429. The async request runs once the replica is idle."""
    mark = tmp_path / "running"
    slow = concurrent.futures.ThreadPoolExecutor(2)
    try:
        first = slow.submit(_req, plat, "POST", "/deployments/tight/predict", json={"sleep": 3, "mark": str(mark)})
        plat.wait("the interactive request runs", mark.exists, 30)
        rid = _submit(plat, "tight", {"i": "queued"}, receiver.url, priority=0)
        time.sleep(0.6)  # a few dispatcher ticks (interval 0.2 s), each woken by the submission
        assert _status(plat, rid)["status"] == "QUEUED"
        second = _req(plat, "POST", "/deployments/tight/predict", json={"i": "interactive"})
        assert second.status_code == 200, second.text
        assert first.result(timeout=30).status_code == 200
    finally:
        slow.shutdown(wait=True)
    assert _wait_status(plat, rid, {"SUCCEEDED"})["attempts"] == 1
    assert rid in receiver.wait_for(1)


def test_webhook_retries_keep_the_id_then_fail(plat: Platform) -> None:
    flaky = Receiver(plat.secret, fail_first=2)  # type: ignore[attr-defined]
    dead = Receiver(plat.secret, fail_first=1000, status=400)  # type: ignore[attr-defined]
    try:
        rid = _submit(plat, "work", {"i": "retry"}, flaky.url)
        flaky.wait_for(1, timeout=60)
        ids = {a["headers"]["webhook-id"] for a in flaky.attempts}
        assert len(flaky.attempts) == 3 and len(ids) == 1  # one idempotency id across the attempts
        assert _wait_status(plat, rid, {"SUCCEEDED"})["webhook"]["attempts"] == 3
        refused = _submit(plat, "work", {"i": "refused"}, dead.url)
        st = _wait_status(plat, refused, {"WEBHOOK_FAILED"})
        assert "400" in st["webhook"]["last_error"]
        assert len(dead.attempts) == 1  # a 4xx is the receiver's refusal: not retried
    finally:
        flaky.close()
        dead.close()


def test_queued_work_wakes_a_deployment_scaled_to_zero(plat: Platform, receiver: Receiver, tmp_path: Path) -> None:
    cold = write_package(tmp_path / "cold", """
        name: cold
        autoscaling: {min_replicas: 0, max_replicas: 1, scale_down_delay_s: 0, window_s: 1}
        """, MODEL)
    plat.api("POST", "/deployments", expect=201, json={"path": str(cold)})
    plat.wait("cold scaled to zero", lambda: not plat.show("cold")["replicas"], timeout=90)
    rid = _submit(plat, "cold", {"i": "cold"}, receiver.url)
    (payload,) = receiver.wait_for(1, timeout=120)[rid]  # the queued request was the load that started a replica
    assert payload["data"]["echo"] == {"i": "cold"}
    ups = [e for e in plat.api("GET", "/deployments/cold/events")["data"] if e["kind"] == "autoscale"
           and e["data"].get("previous") == 0 and e["data"].get("desired") == 1]
    assert ups, "the queued request did not scale the deployment up from zero"


def test_kill_9_mid_queue_loses_nothing(plat: Platform, receiver: Receiver) -> None:
    ids = [_submit(plat, "work", {"sleep": 0.5, "i": i}, receiver.url) for i in range(10)]
    plat.wait("some delivered, some queued", lambda: 1 <= len(receiver.by_request()) < 10, timeout=60, every=0.02)
    pids = plat.replica_pids()
    plat.stop(signal.SIGKILL)
    try:
        time.sleep(0.5)
        Platform.start(plat)
        got = receiver.wait_for(10, timeout=120)
        assert set(got) == set(ids)
        # Every request's webhook, under one webhook-id: a receiver deduplicating on it processes each exactly once.
        # A delivery the kill cut off between the receiver's 2xx and the platform recording it is sent again (same
        # id): at most the deliveries in flight at that moment.
        assert all(len(w) == 1 for w in receiver.ids_by_request().values())
        assert receiver.duplicates() <= 2 and receiver.bad_signatures == 0
        assert all(_status(plat, rid)["status"] == "SUCCEEDED" for rid in ids)
    finally:
        kill_leftovers([pid for pid in pids if pid not in plat.replica_pids()])
