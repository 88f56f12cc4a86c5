"""Fuzzing an LLM replica (tiny random Llama, real `ballast serve`) with every bad input we can build.

Each bad request must get a 4xx OpenAI-shaped JSON error with a request id: never a 5xx, never a
hang (every call has a bounded timeout). Afterwards a valid request still succeeds and the replica
is still ready, i.e. no input took the engine down. Bad values are generated from each numeric
field's range (just outside it, far outside it, wrong JSON types, NaN/Infinity) and, with
hypothesis, as arbitrary JSON in every field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.runtime.test_llm_serving import llm_package

pytest.importorskip("ballast.engine", reason="the native engine is not built")

BIG = 2**70
MSGS = [{"role": "user", "content": "Say something about cats."}]
CHAT = {"model": "tiny-chat", "messages": MSGS, "max_tokens": 4}
COMPLETION = {"model": "tiny-chat", "prompt": "The cat", "max_tokens": 4}

# field: (integer?, lowest valid, highest valid, nullable)
NUMERIC = {
    "max_tokens": (True, 1, 1 << 20, True),
    "temperature": (False, 0, 2, True),
    "top_p": (False, 1e-9, 1, True),
    "n": (True, 1, 16, False),
    "seed": (True, -(2**63), 2**63 - 1, True),
    "presence_penalty": (False, -2, 2, True),
    "frequency_penalty": (False, -2, 2, True),
    "top_k": (True, -1, 1 << 20, True),
    "min_p": (False, 0, 1, True),
    "repetition_penalty": (False, 0.01, 10, True),
}
CHAT_ONLY = {"max_completion_tokens": (True, 1, 1 << 20, True), "top_logprobs": (True, 0, 20, True)}
COMPLETION_ONLY = {"logprobs": (True, 0, 20, True), "best_of": (True, 1, 16, True)}
RAW = object()  # marks a value written as raw JSON text (NaN, Infinity)


def bad_values(integer: bool, lo: float, hi: float, nullable: bool) -> list[Any]:
    out: list[Any] = [BIG, -BIG, 10**30, -(10**30), 1e308, -1e308, "1", "abc", "", True, False, [], [1], {}, {"a": 1},
                      (RAW, "NaN"), (RAW, "Infinity"), (RAW, "-Infinity")]
    out += [hi + 1 if integer else hi + 0.5, lo - 1 if integer else lo - 0.5]
    if integer:
        out += [1.5, float(lo) + 0.5, 2**63, -(2**63) - 1]
    if not nullable:
        out.append(None)
    if lo > 0 and not integer:
        out.append(0)
    return [v for v in out if not (isinstance(v, int | float) and not isinstance(v, bool) and lo <= v <= hi)]


def encode(body: dict[str, Any]) -> bytes:
    raw: dict[str, str] = {}

    def walk(v: Any) -> Any:
        if isinstance(v, tuple) and v and v[0] is RAW:
            key = f"@@raw{len(raw)}@@"
            raw[key] = v[1]
            return key
        return v

    text = json.dumps({k: walk(v) for k, v in body.items()})
    for key, val in raw.items():
        text = text.replace(f'"{key}"', val)
    return text.encode()


def numeric_cases() -> list[tuple[str, str, dict[str, Any]]]:
    cases = []
    for route, base, fields in (("/v1/chat/completions", CHAT, {**NUMERIC, **CHAT_ONLY}),
                                ("/v1/completions", COMPLETION, {**NUMERIC, **COMPLETION_ONLY})):
        for field, spec in fields.items():
            for v in bad_values(*spec):
                cases.append((route, field, {**base, field: v}))
    return cases


def shape_cases() -> list[tuple[str, Any]]:
    chat, comp = "/v1/chat/completions", "/v1/completions"
    c = []
    for msgs in ([], "hi", {"role": "user"}, ["hi"], [{}], [{"role": "wizard", "content": "x"}],
                 [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "image_url"}]}],
                 [{"role": "user", "content": [{"type": "text", "text": 5}]}], [{"role": None, "content": "x"}],
                 [{"role": "user", "content": "\ud800"}], [{"role": "user", "content": "a", "name": "\udfff"}],
                 [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}], None):
        c.append((chat, {**CHAT, "messages": msgs}))
    c.append((chat, {k: v for k, v in CHAT.items() if k != "messages"}))
    for stop in (["a", "b", "c", "d", "e"], ["x" * 5000], [""], "", 123, [1, 2], ["ok", None], ["\ud800"],
                 ["a"] * 10_000):
        c.append((chat, {**CHAT, "stop": stop}))
        c.append((comp, {**COMPLETION, "stop": stop}))
    for ids in ([-1], [BIG], ["a"], [True], [1.5], [10**9], list(range(100))):
        c.append((chat, {**CHAT, "stop_token_ids": ids}))
    for prompt in ([], [[]], [-1], [BIG], [1.5], [True], {"a": 1}, None, 5, [["a"]], ["x"] * 65, [10**6],
                   [[1, 2], [10**6]], "\ud800", "cats " * 2000):
        c.append((comp, {**COMPLETION, "prompt": prompt}))
    c.append((comp, {k: v for k, v in COMPLETION.items() if k != "prompt"}))
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    for route, base in ((chat, CHAT), (comp, COMPLETION)):
        for extra in ({"model": 5}, {"model": "nope"}, {"model": "\ud800"}, {"stream": "yes"}, {"stream": 1},
                      {"stream_options": {"include_usage": "yes"}}, {"stream_options": 5}, {"ignore_eos": "no"},
                      {"user": 5}, {"tools": [{"type": "function"}]}, {"logit_bias": {"1": 5}},
                      {"max_tokens": 512}, {"\ud800": 1}, {"extra": {"deep": deep}}):
            c.append((route, {**base, **extra}))
    c.append((chat, {**CHAT, "logprobs": "true"}))
    # Structured outputs are served; what they refuse is a malformed or unenforceable constraint.
    c.append((chat, {**CHAT, "response_format": {"type": "json_schema"}}))
    c.append((chat, {**CHAT, "response_format": {"type": "yaml"}}))
    c.append((chat, {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}}))
    c.append((chat, {**CHAT, "guided_regex": "("}))
    c.append((chat, {**CHAT, "guided_choice": []}))
    c.append((comp, {**COMPLETION, "logprobs": True}))
    c.append((comp, {**COMPLETION, "echo": True}))
    c.append((comp, {**COMPLETION, "suffix": "x"}))
    for route in (chat, comp):
        for body in ([], "x", 1, None, [CHAT]):
            c.append((route, body))
    for body in ({"prompt": 5}, {"prompt": "a", "messages": MSGS}, {}, {"prompt": "\ud800"},
                 {"messages": [{"role": "x"}]}, {"prompt": "a", "model": "nope"},
                 {"prompt": "a", "add_special_tokens": 1}):
        c.append(("/tokenize", body))
    for body in ({"tokens": [-1]}, {"tokens": ["a"]}, {"tokens": [BIG]}, {"tokens": [10**6]}, {"tokens": 5}, {},
                 {"tokens": [True]}, {"tokens": [1.5]}):
        c.append(("/detokenize", body))
    return c


RAW_BODIES = [
    ("/v1/chat/completions", b"[" * 5000 + b"]" * 5000),
    ("/v1/chat/completions", b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("/v1/chat/completions", b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("/v1/completions", b'{"prompt": "\\udc00x", "max_tokens": 2}'),
    ("/v1/completions", b'{"prompt": "a", "seed": ' + str(2**70).encode() + b"}"),
    ("/v1/completions", b'{"prompt": "a", "temperature": NaN}'),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": 1e400}'),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}"),
    ("/v1/completions", b"{not json"),
    ("/v1/completions", b""),
    ("/v1/completions", b"\xff\xfe"),
    ("/tokenize", b"[" * 5000 + b"]" * 5000),
    ("/detokenize", b'{"tokens": "\\ud800"}'),
]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import Replica

    rep = Replica(llm_package(tmp_path_factory.mktemp("fuzz") / "tiny", tiny_checkpoint))
    try:
        rep.wait_ready(180)
        yield rep
    finally:
        rep.stop()


@pytest.fixture(scope="module")
def http(llm):
    with httpx.Client(base_url=llm.url, timeout=httpx.Timeout(30)) as c:
        yield c


def assert_client_error(r: httpx.Response, what: Any) -> None:
    assert 400 <= r.status_code < 500, f"{what!r:.300} -> {r.status_code} {r.text[:300]}"
    err = r.json()["error"]
    assert err["message"] and err["type"], what
    assert r.headers.get("x-request-id"), what


def post(http: httpx.Client, route: str, body: Any) -> httpx.Response:
    data = encode(body) if isinstance(body, dict) else json.dumps(body).encode()
    return http.post(route, content=data, headers={"content-type": "application/json"})


def test_every_bad_numeric_field_is_a_400_naming_it(http):
    cases = numeric_cases()
    assert len(cases) > 300
    for route, field, body in cases:
        r = post(http, route, body)
        assert_client_error(r, body)
        assert r.status_code == 400
        assert field in (r.json()["error"]["param"] or "") + r.json()["error"]["message"], (body, r.text)


def test_every_bad_shape_is_a_4xx(http):
    for route, body in shape_cases():
        assert_client_error(post(http, route, body), (route, body))


def test_raw_bodies_deep_nesting_surrogates_and_bad_json(http):
    for route, raw in RAW_BODIES:
        r = http.post(route, content=raw, headers={"content-type": "application/json"})
        assert_client_error(r, raw[:80])
        assert r.status_code == 400


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
COMMON = {*NUMERIC, "stop", "stop_token_ids", "stream", "stream_options", "model", "user", "ignore_eos"}
ROUTES = [("/v1/chat/completions", CHAT, sorted({*COMMON, *CHAT_ONLY, "messages", "logprobs", "response_format"})),
          ("/v1/completions", COMPLETION, sorted({*COMMON, *COMPLETION_ONLY, "prompt", "echo", "suffix"}))]


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(ROUTES), data=st.data(), value=JSON, stream=st.booleans())
def test_arbitrary_json_in_any_field_never_breaks_the_replica(http, route, data, value, stream):
    path, base, fields = route
    body = {**base, "stream": stream, data.draw(st.sampled_from(fields)): value}
    r = post(http, path, body)
    assert r.status_code < 500, (body, r.status_code, r.text[:300])
    assert r.headers.get("x-request-id")
    if r.status_code >= 400:
        assert r.json()["error"]["message"]


def test_after_the_fuzzing_the_engine_still_serves(http):
    # Runs last in this module: every bad input above has been through the same replica.
    r = post(http, "/v1/chat/completions", {**CHAT, "max_tokens": 8, "temperature": 0, "seed": 2**63 - 1, "n": 2})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2 and r.json()["usage"]["completion_tokens"] > 0
    r = post(http, "/v1/completions", {**COMPLETION, "prompt": ["The cat", "A dog"], "n": 2, "seed": -(2**63)})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4, r.text
    assert http.get("/health/ready").status_code == 200
    assert http.get("/health/live").status_code == 200


def test_a_dead_engine_fails_liveness_and_readiness(tiny_checkpoint: Path, tmp_path: Path):
    """In process: the real EngineHost over a real engine whose thread dies reports FAILED (live) and
    not healthy (ready), and requests get a 503 instead of hanging."""
    import asyncio

    from ballast.openai import APIError
    from ballast.package.package import load_package
    from ballast.runtime.llm import EngineHost
    from ballast.runtime.model import LoadState

    async def run() -> None:
        host = EngineHost(load_package(llm_package(tmp_path / "tiny", tiny_checkpoint)))
        await host.load()
        assert host.state is LoadState.READY and await host.healthy() == (True, None)
        host.engine._commands.put(("add", None))  # a malformed command kills the engine thread
        host.engine._wake.set()
        for _ in range(500):
            if host.engine.dead:
                break
            await asyncio.sleep(0.01)
        ok, reason = await host.healthy()
        assert not ok and "died" in reason and host.state is LoadState.FAILED
        with pytest.raises(APIError) as e:
            await host.call("chat_completions", dict(CHAT))
        assert e.value.status == 503
        await host.shutdown()

    asyncio.run(run())
