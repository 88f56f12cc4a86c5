"""Capture, feedback and datasets end to end: a real `ballast up`, real replica processes (a Python chat model),
the real SQLite store. Capture off writes nothing; redaction happens before the store sees a byte; the header
needs the `capture` scope; feedback is the requesting key's (or an admin's); export prefers corrections;
deletion removes the rows."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import write_package
from tests.control.platform import Platform, kill_leftovers

MODEL = """
class Model:
    def predict(self, inputs):
        return inputs

    async def chat_completions(self, request):
        text = request["messages"][-1]["content"]
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": request["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "You said: " + text},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
"""
SSN = "123-45-6789"


@pytest.fixture(scope="module")
def plat(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("capture")
    p = Platform(root / "home").start()
    try:
        noted = write_package(root / "noted", r"""
            name: noted
            autoscaling: {min_replicas: 1, max_replicas: 1}
            capture: {dataset: notes, sample_rate: 1.0, redact: ['\d{3}-\d{2}-\d{4}', 'tok-\w+'], retention_days: 7}
            """, MODEL)
        plain = write_package(root / "plain", "name: plain\nautoscaling: {min_replicas: 1, max_replicas: 1}\n", MODEL)
        for pkg in (noted, plain):
            p.api("POST", "/deployments", expect=201, json={"path": str(pkg)})
        for name in ("noted", "plain"):
            p.wait_serving(name, 1, timeout=120)
        yield p
    finally:
        pids = p.replica_pids() if p.proc and p.proc.poll() is None else []
        p.stop()
        kill_leftovers(pids)


def _chat(p: Platform, model: str, text: str, key: str | None = None, **headers: str) -> httpx.Response:
    return httpx.post(p.url + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {key or p.key}", **headers},
                      json={"model": model, "messages": [{"role": "user", "content": text}]})


def _key(p: Platform, *scopes: str) -> str:
    return str(p.api("POST", "/keys", expect=201, json={"scopes": list(scopes)})["key"])


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers.get("x-request-id")
    return dict(r.json()["error"])


def _store_bytes(p: Platform) -> bytes:
    return b"".join(f.read_bytes() for f in Path(p.home).glob("state.db*"))


def test_capture_off_writes_nothing(plat: Platform) -> None:
    r = _chat(plat, "plain", f"my number is {SSN}")
    assert r.status_code == 200, r.text
    assert plat.api("GET", "/datasets")["data"] == []
    assert SSN.encode() not in _store_bytes(plat)


def test_capture_redacts_before_writing(plat: Platform) -> None:
    r = _chat(plat, "noted", f"my number is {SSN}, token tok-abc123")
    assert r.status_code == 200 and SSN in r.json()["choices"][0]["message"]["content"]  # the caller's answer is whole
    shown = plat.api("GET", "/datasets/notes")
    assert shown["examples"] == 1
    example = shown["data"][0]
    assert example["request_id"] == r.headers["x-request-id"] and example["deployment"] == "noted"
    said = "my number is [REDACTED], token [REDACTED]"
    assert example["messages"] == [{"role": "user", "content": said},
                                   {"role": "assistant", "content": "You said: " + said}]
    assert SSN.encode() not in _store_bytes(plat) and b"tok-abc123" not in _store_bytes(plat)


def test_header_needs_the_capture_scope(plat: Platform) -> None:
    plain_key = _key(plat, "inference")
    assert _error(_chat(plat, "plain", "hi", plain_key, **{"x-ballast-capture": "picked"}), 403)["code"] == \
        "insufficient_scope"
    assert _error(_chat(plat, "plain", "hi", **{"x-ballast-capture": "../etc"}), 400)["code"] == "invalid_request"
    capture_key = _key(plat, "inference", "capture")
    r = _chat(plat, "plain", "keep this one", capture_key, **{"x-ballast-capture": "picked"})
    assert r.status_code == 200, r.text
    names = {d["name"]: d["examples"] for d in plat.api("GET", "/datasets")["data"]}
    assert names == {"notes": 1, "picked": 1}


def test_feedback_is_the_requesting_keys(plat: Platform) -> None:
    owner = _key(plat, "inference", "capture")
    other = _key(plat, "inference")
    rid = _chat(plat, "plain", "draft a note", owner, **{"x-ballast-capture": "fb"}).headers["x-request-id"]

    def feedback(key: str, body: Any) -> httpx.Response:
        return httpx.post(plat.url + "/v1/feedback", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    assert _error(feedback(other, {"request_id": rid, "rating": 1}), 404)["code"] == "not_found"
    assert _error(feedback(owner, {"request_id": "nope", "rating": 1}), 404)["code"] == "not_found"
    assert _error(feedback(owner, {"request_id": rid}), 400)["code"] == "invalid_request"
    assert _error(feedback(owner, {"request_id": rid, "correction": 5}), 400)["param"] == "correction"
    r = feedback(owner, {"request_id": rid, "rating": -1, "correction": "A better note."})
    assert r.status_code == 200, r.text
    assert r.json()["correction"] == {"role": "assistant", "content": "A better note."}
    exported = plat.api("GET", "/datasets/fb/export")
    assert exported["train"] == [{"messages": [{"role": "user", "content": "draft a note"},
                                               {"role": "assistant", "content": "A better note."}]}]
    assert feedback(plat.key or "", {"request_id": rid, "rating": 2}).status_code == 200  # an admin may


def test_import_export_split_and_delete(plat: Platform) -> None:
    good = '{"messages": [{"role": "user", "content": "q%d"}, {"role": "assistant", "content": "a%d"}]}'
    bad = good % (1, 1) + "\n" + '{"messages": [{"role": "user", "content": "no answer"}]}\n'
    err = plat.api("POST", "/datasets/imp/import", expect=400, json={"jsonl": bad})["error"]
    assert err["message"].startswith("line 2:")
    plat.api("GET", "/datasets/imp", expect=404)  # nothing half-imported
    text = "\n".join(good % (i, i) for i in range(10))
    assert plat.api("POST", "/datasets/imp/import", expect=201, json={"jsonl": text})["imported"] == 10
    split = plat.api("GET", "/datasets/imp/export", params={"held_out": 0.3, "seed": 7})
    assert len(split["train"]) == 7 and len(split["held_out"]) == 3
    assert sorted(map(str, split["train"] + split["held_out"])) == sorted(
        str({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
        for i in range(10))
    assert plat.api("GET", "/datasets/imp/export", params={"held_out": 0.3, "seed": 7}) == split  # reproducible

    rid = plat.api("GET", "/datasets/notes")["data"][0]["request_id"]
    assert plat.api("DELETE", f"/datasets/notes/records/{rid}")["deleted"] == 1
    plat.api("GET", "/datasets/notes", expect=404)
    assert plat.api("DELETE", "/datasets/imp")["deleted"] == 10
    plat.api("DELETE", "/datasets/imp", expect=404)


def test_cli_round_trip(plat: Platform, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{oops\n')
    bad = plat.cli("datasets", "import", "cli", str(src), check=False)
    assert bad.returncode != 0 and "line 2" in bad.stdout + bad.stderr
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
             for i in range(4)]
    src.write_text("\n".join(lines) + "\n")
    assert "4 examples imported into cli" in plat.cli("datasets", "import", "cli", str(src)).stdout
    assert "cli" in plat.cli("datasets", "list").stdout
    assert "assistant: a0" in plat.cli("datasets", "show", "cli").stdout
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    plat.cli("datasets", "export", "cli", "-o", str(train), "--held-out", "0.25", "--held-out-file", str(held))
    assert sorted(train.read_text().splitlines() + held.read_text().splitlines()) == sorted(lines)
    assert len(held.read_text().splitlines()) == 1
    assert "4 examples deleted" in plat.cli("datasets", "delete", "cli").stdout


def test_feedback_bad_bodies(plat: Platform) -> None:
    def post(content: bytes) -> httpx.Response:
        return httpx.post(plat.url + "/v1/feedback", content=content, timeout=30,
                          headers={"Authorization": f"Bearer {plat.key}", "content-type": "application/json"})

    assert _error(post(b"{not json"), 400)["code"] == "invalid_json"
    assert _error(post(b"[" * 5000 + b"]" * 5000), 400)["code"] == "invalid_json"
    assert _error(post(b"[]"), 400)["param"] == "request_id"
    assert _error(post(b'{"request_id": "x", "rating": [1]}'), 400)["param"] == "rating"
    assert _error(post(b" " * (2**20 + 1)), 413)["code"] == "request_too_large"


# ---- a tiny LLM: chat, completions and the Responses API, whole and streamed --------------------------------
SECRET = re.compile(r"secret-[0-9]+")
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def tiny(plat: Platform, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A captured LLM deployment whose replica answers to another name than the deployment's."""
    pytest.importorskip("ballast.engine", reason="the native engine is not built")
    pkg = write_package(tmp_path_factory.mktemp("tiny") / "tiny", f"""
        name: tiny
        engine: {{kind: native, checkpoint: {tiny_checkpoint}, served_model_name: tiny-served, max_model_len: 2048,
                  kv_cache_memory: 64Mi}}
        autoscaling: {{min_replicas: 1, max_replicas: 1}}
        capture: {{dataset: tinyset, redact: ['secret-[0-9]+']}}
        """)
    plat.api("POST", "/deployments", expect=201, json={"path": str(pkg)})
    plat.wait_serving("tiny", 1, timeout=180)
    return "tiny"


def _post(p: Platform, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(p.url + path, json=body, headers={"Authorization": f"Bearer {p.key}"}, timeout=120)


def _stream(p: Platform, path: str, body: dict[str, Any], **headers: str) -> tuple[str, str]:
    """(the request id, the raw SSE text) of a streamed request read to its end."""
    with httpx.stream("POST", p.url + path, json={**body, "stream": True}, timeout=120,
                      headers={"Authorization": f"Bearer {p.key}", **headers}) as s:
        assert s.status_code == 200
        return s.headers["x-request-id"], s.read().decode()


def _captured(p: Platform, request_id: str) -> list[dict[str, Any]]:
    """The captured messages of one request, waited for: a stream's pair is written just after it ends."""
    def find() -> list[dict[str, Any]] | None:
        r = p.api("GET", "/datasets/tinyset", expect=None, params={"limit": 1000})
        rows = r.get("data", []) if isinstance(r, dict) else []
        return next((x["messages"] for x in rows if x["request_id"] == request_id), None)

    return list(p.wait(f"request {request_id} captured", find, timeout=30, every=0.2))


def test_chat_whole_and_streamed_are_captured_alike(plat: Platform, tiny: str) -> None:
    body = {"model": tiny, "messages": [{"role": "user", "content": "say secret-42"}], "max_tokens": 12,
            "temperature": 0}
    r = _post(plat, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]["message"]
    said = {"role": "user", "content": "say [REDACTED]"}
    whole = _captured(plat, r.headers["x-request-id"])
    assert whole == [said, {**answer, "content": SECRET.sub("[REDACTED]", answer["content"])}]
    rid, text = _stream(plat, "/v1/chat/completions", body)
    assert "data: [DONE]" in text and "[REDACTED]" not in text  # the client's stream is untouched
    assert _captured(plat, rid) == whole

    tools = {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
             "max_tokens": 80}
    r = _post(plat, "/v1/chat/completions", {**body, **tools})
    call = r.json()["choices"][0]["message"]["tool_calls"][0]
    rid, _ = _stream(plat, "/v1/chat/completions", {**body, **tools})
    streamed = _captured(plat, rid)[-1]
    assert streamed["content"] is None and [c["function"] for c in streamed["tool_calls"]] == [call["function"]]
    assert streamed["tool_calls"][0]["id"].startswith("call_")


def test_completions_and_responses_are_captured(plat: Platform, tiny: str) -> None:
    comp = {"model": tiny, "prompt": "The secret-7 is", "max_tokens": 8, "temperature": 0}
    r = _post(plat, "/v1/completions", comp)
    assert r.status_code == 200, r.text
    text = SECRET.sub("[REDACTED]", r.json()["choices"][0]["text"])
    expected = [{"role": "user", "content": "The [REDACTED] is"}, {"role": "assistant", "content": text}]
    assert _captured(plat, r.headers["x-request-id"]) == expected
    rid, _ = _stream(plat, "/v1/completions", comp)
    assert _captured(plat, rid) == expected

    resp = {"model": tiny, "instructions": "Be brief.", "input": "Hello secret-9", "max_output_tokens": 8,
            "temperature": 0}
    r = _post(plat, "/v1/responses", resp)
    assert r.status_code == 200, r.text
    out = SECRET.sub("[REDACTED]", r.json()["output"][0]["content"][0]["text"])
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello [REDACTED]"},
                {"role": "assistant", "content": out}]
    assert _captured(plat, r.headers["x-request-id"]) == expected
    rid, text = _stream(plat, "/v1/responses", resp)
    assert f"event: response.{r.json()['status']}" in text  # completed, or incomplete at max_output_tokens
    assert _captured(plat, rid) == expected

    tool = {"type": "function", **WEATHER["function"]}
    rid, _ = _stream(plat, "/v1/responses", {**resp, "tools": [tool], "max_output_tokens": 80,
                                             "tool_choice": {"type": "function", "name": "get_weather"}})
    [call] = _captured(plat, rid)[-1]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and "city" in json.loads(call["function"]["arguments"])


def test_an_abandoned_stream_and_a_skipped_one_write_nothing(plat: Platform, tiny: str) -> None:
    body = {"model": tiny, "messages": [{"role": "user", "content": "tell a long story"}], "max_tokens": 400,
            "temperature": 1.0, "stream": True, "ignore_eos": True}
    key = plat.api("POST", "/keys", expect=201, json={"scopes": ["inference"]})
    with httpx.stream("POST", plat.url + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {key['key']}"}) as s:
        abandoned = s.headers["x-request-id"]
        next(s.iter_raw())  # one chunk, then the client goes away
    # Metered once the gateway's relay of it is over: a pair, had there been one, would be on its way by then.
    plat.wait("the abandoned stream metered", lambda: plat.api("GET", f"/usage?key={key['id']}&group=key")["data"],
              timeout=60, every=0.5)
    token_ids = _post(plat, "/v1/completions", {"model": tiny, "prompt": [[1, 2, 3]], "max_tokens": 2})
    assert token_ids.status_code == 200  # answered, but token ids are not a conversation: not captured
    marker, _ = _stream(plat, "/v1/chat/completions", {**body, "max_tokens": 2, "ignore_eos": False})
    _captured(plat, marker)
    ids = {x["request_id"] for x in plat.api("GET", "/datasets/tinyset", params={"limit": 1000})["data"]}
    assert abandoned not in ids and token_ids.headers["x-request-id"] not in ids
    # The header picks the dataset for a stream as for a whole answer.
    picked, _ = _stream(plat, "/v1/chat/completions", {**body, "max_tokens": 2}, **{"x-ballast-capture": "picked-s"})
    plat.wait("the header's stream captured", lambda: plat.api("GET", "/datasets/picked-s", expect=None).get("data"),
              timeout=30, every=0.2)
    assert [x["request_id"] for x in plat.api("GET", "/datasets/picked-s")["data"]] == [picked]
    assert picked not in {x["request_id"] for x in plat.api("GET", "/datasets/tinyset", params={"limit": 1000})["data"]}
