"""The OpenAI Batch API through the gateway with the official openai SDK, unchanged: files.create, batches.create,
retrieve, list, cancel, files.content; malformed and duplicate lines refused naming the line."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import write_package
from tests.control.platform import Platform, kill_leftovers
from tests.gateway.test_async_e2e import MODEL


@pytest.fixture(scope="module")
def plat(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("batches")
    p = Platform(root / "home").start()
    try:
        echo = write_package(root / "echo", """
            name: echo
            autoscaling: {min_replicas: 1, max_replicas: 1, concurrency_target: 4}
            """, MODEL)
        one = write_package(root / "one", """
            name: one
            autoscaling: {min_replicas: 1, max_replicas: 1, concurrency_target: 1}
            """, MODEL)
        for pkg in (echo, one):
            p.api("POST", "/deployments", expect=201, json={"path": str(pkg)})
        for name in ("echo", "one"):
            p.wait_serving(name, 1, timeout=120)
        yield p
    finally:
        pids = p.replica_pids() if p.proc and p.proc.poll() is None else []
        p.stop()
        kill_leftovers(pids)


def _client(p: Platform, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=p.url + "/v1", api_key=key or p.key, max_retries=0, timeout=30)


def _line(cid: str, text: str, model: str = "echo") -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": text}]}}


def _jsonl(rows: list[Any]) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def test_sdk_batch_flow(plat: Platform) -> None:
    c = _client(plat)
    f = c.files.create(file=("in.jsonl", io.BytesIO(_jsonl([_line(f"r{i}", f"hi {i}") for i in range(5)]))),
                       purpose="batch")
    assert f.purpose == "batch" and f.bytes > 0 and c.files.retrieve(f.id).filename == "in.jsonl"
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"job": "nightly"})
    assert b.status in ("validating", "in_progress") and b.request_counts and b.request_counts.total == 5
    done = plat.wait("batch completed", lambda: (x := c.batches.retrieve(b.id)).status == "completed" and x,
                     timeout=60)
    assert done.request_counts.completed == 5 and done.request_counts.failed == 0
    assert done.metadata == {"job": "nightly"} and done.completed_at and done.error_file_id is None
    lines = [json.loads(x) for x in c.files.content(done.output_file_id).text.splitlines()]
    by_id = {x["custom_id"]: x for x in lines}
    assert set(by_id) == {f"r{i}" for i in range(5)}
    for i in range(5):
        resp = by_id[f"r{i}"]["response"]
        assert by_id[f"r{i}"]["error"] is None and resp["status_code"] == 200
        assert resp["body"]["choices"][0]["message"]["content"] == f"HI {i}"
        assert resp["body"]["system_fingerprint"] == "priority-4"  # batch lines run last in the engine
        # Each line reaches the replica under its own request id (an engine refuses a second request with one).
        assert resp["body"]["id"] == f"chatcmpl-{by_id[f'r{i}']['id']}.1"
    assert b.id in [x.id for x in c.batches.list(limit=10).data]
    # another key sees none of it
    other = plat.api("POST", "/keys", expect=201, json={"scopes": ["inference"]})["key"]
    with pytest.raises(openai.NotFoundError):
        _client(plat, other).batches.retrieve(b.id)
    with pytest.raises(openai.NotFoundError):
        _client(plat, other).files.content(f.id)
    assert c.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


def test_failed_lines_go_to_the_error_file(plat: Platform) -> None:
    c = _client(plat)
    bad = _line("bad", "x")
    bad["body"]["messages"] = "not a list"  # the replica's own 4xx/5xx for this line
    f = c.files.create(file=("in.jsonl", io.BytesIO(_jsonl([_line("ok", "fine"), bad]))), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = plat.wait("batch done", lambda: (x := c.batches.retrieve(b.id)).status == "completed" and x, timeout=60)
    assert done.request_counts.completed == 1 and done.request_counts.failed == 1
    (err,) = [json.loads(x) for x in c.files.content(done.error_file_id).text.splitlines()]
    assert err["custom_id"] == "bad" and err["error"]["message"] and err["response"]["status_code"] >= 400


def test_cancel(plat: Platform) -> None:
    c = _client(plat)
    rows = [{**_line(f"s{i}", "x"), "url": "/v1/chat/completions"} for i in range(3)]
    f = c.files.create(file=("in.jsonl", io.BytesIO(_jsonl(rows))), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    try:
        x = c.batches.cancel(b.id)
        assert x.status == "cancelling" and x.cancelling_at
    except openai.ConflictError:
        pass  # it finished first: nothing left to cancel
    final = plat.wait("batch final", lambda: (y := c.batches.retrieve(b.id)).status in ("cancelled", "completed") and y,
                      timeout=60)
    assert final.request_counts.completed + final.request_counts.failed <= 3
    with pytest.raises(openai.ConflictError):
        c.batches.cancel(b.id)


@pytest.mark.parametrize(("rows", "message"), [
    ([_line("a", "x"), b"{not json"], "line 2: not valid JSON"),
    ([_line("a", "x"), _line("a", "y")], "line 2: custom_id `a` duplicates line 1"),
    ([{**_line("a", "x"), "method": "GET"}], "line 1: method must be POST"),
    ([{**_line("a", "x"), "url": "/v1/images"}], "line 1: url must be one of"),
    ([{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}], "line 1: body must"),
    ([_line("a", "x"), [1, 2]], "line 2: each line must be a JSON object"),
    ([], "the file has no requests"),
])
def test_malformed_files_are_refused_naming_the_line(plat: Platform, rows: list[Any], message: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        _client(plat).files.create(file=("in.jsonl", io.BytesIO(_jsonl(rows))), purpose="batch")
    assert message in str(e.value)


def test_batches_whose_lines_cannot_run_fail_with_nothing_queued(plat: Platform) -> None:
    c = _client(plat)
    f = c.files.create(file=("in.jsonl", io.BytesIO(_jsonl([_line("a", "x"), _line("b", "y", model="nope")]))),
                       purpose="batch")
    # As OpenAI reports a file that fails validation: a `failed` batch whose errors name the lines.
    failed = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert failed.status == "failed" and failed.failed_at and failed.errors and failed.errors.data
    (e,) = failed.errors.data
    assert e.line == 2 and e.code == "model_not_found" and e.message and "nope" in e.message
    assert failed.request_counts and failed.request_counts.total == 0  # nothing queued: no queue place, no budget
    other = c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    assert other.status == "failed" and other.errors and [x.line for x in other.errors.data] == [1, 2]
    assert "not the batch's endpoint" in (other.errors.data[0].message or "")
    assert c.batches.retrieve(failed.id).status == "failed"
    with pytest.raises(openai.ConflictError):
        c.batches.cancel(failed.id)
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h")  # type: ignore
    with pytest.raises(openai.NotFoundError):
        c.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    r = httpx.post(plat.url + "/v1/files", headers={"Authorization": f"Bearer {plat.key}"}, json={"x": 1}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    with pytest.raises(openai.BadRequestError, match="purpose"):
        c.files.create(file=("in.jsonl", io.BytesIO(_jsonl([_line("a", "x")]))), purpose="assistants")


def test_file_expiry_and_list_pagination(plat: Platform) -> None:
    key = plat.api("POST", "/keys", expect=201, json={"scopes": ["inference"]})["key"]
    c = _client(plat, key)
    ids = [c.files.create(file=(f"in{i}.jsonl", io.BytesIO(_jsonl([_line("a", "x")]))), purpose="batch").id
           for i in range(5)]
    kept = c.files.create(file=("short.jsonl", io.BytesIO(_jsonl([_line("a", "x")]))), purpose="batch",
                          expires_after={"anchor": "created_at", "seconds": 3600})
    assert kept.expires_at is not None and kept.expires_at - kept.created_at == 3600
    assert (c.files.retrieve(ids[0]).expires_at or 0) - c.files.retrieve(ids[0]).created_at == 30 * 86400
    with pytest.raises(openai.BadRequestError, match="expires_after"):
        c.files.create(file=("x.jsonl", io.BytesIO(_jsonl([_line("a", "x")]))), purpose="batch",
                       expires_after={"anchor": "created_at", "seconds": 60})
    first = c.files.list(limit=2)
    assert len(first.data) == 2 and first.has_more and first.data[0].id == kept.id
    assert [x.id for x in c.files.list(limit=2)] == [kept.id, *reversed(ids)]  # the SDK pages with `after`
    assert [x.id for x in c.files.list(limit=10, after=ids[2]).data] == [ids[1], ids[0]]
    r = httpx.get(plat.url + "/v1/files?limit=0", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
    for i in range(3):
        c.batches.create(input_file_id=ids[i], endpoint="/v1/embeddings", completion_window="24h")  # failed ones
    page = c.batches.list(limit=2)
    assert len(page.data) == 2 and page.has_more and len(list(c.batches.list(limit=2))) == 3


def test_expired_files_are_deleted(tmp_path: Path) -> None:
    p = Platform(tmp_path / "home")
    p.env["BALLAST_FILE_RETENTION_DAYS"] = "0.0001"  # 8.64 s
    p.start()
    try:
        c = _client(p)
        f = c.files.create(file=("in.jsonl", io.BytesIO(_jsonl([_line("a", "x")]))), purpose="batch")
        assert f.expires_at in (f.created_at + 8, f.created_at + 9)
        p.wait("the file expired", lambda: httpx.get(p.url + f"/v1/files/{f.id}", timeout=10, headers={
            "Authorization": f"Bearer {p.key}"}).status_code == 404, timeout=60, every=0.5)
        assert c.files.list().data == []
        with pytest.raises(openai.NotFoundError):
            c.files.content(f.id)
    finally:
        p.stop()


def test_batch_lines_obey_the_keys_token_budget(plat: Platform) -> None:
    key = plat.api("POST", "/keys", expect=201, json={"scopes": ["inference"], "token_budget": 5})["key"]
    c = _client(plat, key)  # each line uses 5 tokens: the first spends the budget, the rest wait for the next period
    f = c.files.create(file=("in.jsonl", io.BytesIO(_jsonl([_line(f"b{i}", "x", "one") for i in range(3)]))),
                       purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    plat.wait("first line done", lambda: c.batches.retrieve(b.id).request_counts.completed >= 1, timeout=60)
    time.sleep(1.5)
    now = c.batches.retrieve(b.id)
    assert now.status == "in_progress" and now.request_counts.completed == 1 and now.request_counts.failed == 0
    c.batches.cancel(b.id)
    final = plat.wait("cancelled", lambda: (x := c.batches.retrieve(b.id)).status == "cancelled" and x, timeout=60)
    assert [json.loads(x)["custom_id"] for x in c.files.content(final.output_file_id).text.splitlines()] == ["b0"]
