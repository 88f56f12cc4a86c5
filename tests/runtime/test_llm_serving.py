"""LLM replicas on the native engine, driven by the official openai client (tiny random Llama)."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import write_package

pytest.importorskip("ballast.engine", reason="the native engine is not built")


def llm_package(root: Path, checkpoint: Path, extra: str = "") -> Path:
    return write_package(
        root,
        f"""
        name: tiny
        engine:
          kind: native
          checkpoint: {checkpoint}
          served_model_name: tiny-chat
          max_model_len: 512
          max_num_seqs: 64
          max_num_batched_tokens: 512
          kv_cache_memory: 64Mi
        {extra}
        """,
    )


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import Replica

    pkg = llm_package(tmp_path_factory.mktemp("llm") / "tiny", tiny_checkpoint)
    rep = Replica(pkg)
    try:
        rep.wait_ready(180)
        yield rep
    finally:
        rep.stop()


def client_for(rep) -> openai.OpenAI:
    return openai.OpenAI(base_url=rep.url + "/v1", api_key="unused", max_retries=0, timeout=60)


MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something about cats."}]


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def test_chat_non_stream_and_stream_agree(llm):
    c = client_for(llm)
    full = c.chat.completions.create(model="tiny-chat", messages=MSGS, max_tokens=24, temperature=0)
    assert full.object == "chat.completion" and full.model == "tiny-chat"
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 0 and full.usage.completion_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.usage.prompt_tokens_details.cached_tokens >= 0

    stream = c.chat.completions.create(model="tiny-chat", messages=MSGS, max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] is [ch for ch in chunks if ch.choices][-1]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # The same prompt again hits the prefix cache.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == choice.message.content
    assert finishes[0].choices[0].finish_reason == choice.finish_reason


def test_completions_stream_and_n_and_seed(llm):
    c = client_for(llm)
    full = c.completions.create(model="tiny-chat", prompt="The cat", max_tokens=16, temperature=0)
    assert full.object == "text_completion" and full.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny-chat", prompt="The cat", max_tokens=16, temperature=0, stream=True) if ch.choices)
    assert streamed == full.choices[0].text
    many = c.completions.create(model="tiny-chat", prompt="The cat", max_tokens=8, n=3, temperature=1.0, seed=7)
    assert sorted(ch.index for ch in many.choices) == [0, 1, 2]
    again = c.completions.create(model="tiny-chat", prompt="The cat", max_tokens=8, n=3, temperature=1.0, seed=7)
    assert [x.text for x in many.choices] == [x.text for x in again.choices]
    stop = c.completions.create(model="tiny-chat", prompt="The cat", max_tokens=16, temperature=0,
                                stop=[full.choices[0].text[3:5]] if len(full.choices[0].text) > 5 else None)
    assert len(stop.choices[0].text) <= len(full.choices[0].text)
    lp = c.chat.completions.create(model="tiny-chat", messages=MSGS, max_tokens=4, temperature=0, logprobs=True,
                                   top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens and all(len(x.top_logprobs) == 2 for x in content)


def test_models_tokenize_detokenize(llm):
    models = client_for(llm).models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]
    tok = httpx.post(llm.url + "/tokenize", json={"prompt": "hello cats"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    assert httpx.post(llm.url + "/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "hello cats"
    bad = httpx.post(llm.url + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_openai_errors(llm):
    c = client_for(llm)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "cat " * 2000}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-17", messages=MSGS)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-chat", messages=MSGS, response_format={"type": "xml"})
    assert e.value.body["param"] == "response_format.type"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-chat", messages=MSGS, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny-chat", messages=[])
    # The engine is fine after all of that.
    assert c.chat.completions.create(model="tiny-chat", messages=MSGS, max_tokens=2).choices


def test_timed_out_streams_abort_and_free_blocks(llm):
    """50 streaming clients that give up after 0.5 s: all time out, the engine frees everything."""

    async def one(client: httpx.AsyncClient) -> str:
        body = {"model": "tiny-chat", "messages": MSGS, "max_tokens": 400, "ignore_eos": True, "stream": True,
                "temperature": 0.8}
        try:
            async with asyncio.timeout(0.5):
                async with client.stream("POST", llm.url + "/v1/chat/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        pass
            return "finished"
        except TimeoutError:
            return "timeout"

    async def main() -> list[str]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*(one(client) for _ in range(50)))

    results = asyncio.run(main())
    assert results.count("timeout") == 50
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = httpx.get(llm.url + "/metrics").text
        if _metric(m, "ballast_llm_requests_running") == 0 and _metric(m, "ballast_llm_requests_waiting") == 0:
            break
        time.sleep(0.1)
    m = httpx.get(llm.url + "/metrics").text
    assert _metric(m, "ballast_llm_requests_running") == 0
    assert _metric(m, "ballast_llm_kv_cache_usage") == 0  # no leaked blocks
    r = client_for(llm).chat.completions.create(model="tiny-chat", messages=MSGS, max_tokens=4)
    assert r.choices[0].message.content is not None
    for name in ("ballast_llm_time_to_first_token_seconds_count", "ballast_llm_inter_token_latency_seconds_count",
                 "ballast_llm_prompt_tokens_total", "ballast_llm_generation_tokens_total",
                 "ballast_llm_prefix_cache_hit_rate"):
        assert name in m


def test_overload_gives_429_with_retry_after(tiny_checkpoint, tmp_path, replica_factory):
    pkg = llm_package(tmp_path / "tiny", tiny_checkpoint, "runtime: {predict_concurrency: 1, max_queue: 0}")
    rep = replica_factory(pkg, ready=True)

    async def main() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": "tiny-chat", "messages": MSGS, "max_tokens": 200, "ignore_eos": True}
            return [r.status_code for r in await asyncio.gather(
                *(client.post(rep.url + "/v1/chat/completions", json=body) for _ in range(4)))]

    codes = asyncio.run(main())
    assert codes.count(200) >= 1 and 429 in codes


def test_command_engine_proxies_to_a_child_server(tiny_checkpoint, tmp_path, replica_factory):
    from tests.conftest import free_port

    inner = llm_package(tmp_path / "inner", tiny_checkpoint)
    child_port = free_port()
    outer = write_package(
        tmp_path / "outer",
        f"""
        name: outer
        engine:
          kind: command
          start: "{sys.executable} -m ballast.cli.main serve {inner} --port {{port}} --no-isolation"
          port: {child_port}
          readiness_path: /health/ready
          liveness_path: /health/live
        """,
    )
    rep = replica_factory(outer)
    c = client_for(rep)
    r = c.chat.completions.create(model="tiny-chat", messages=MSGS, max_tokens=8, temperature=0)
    assert r.usage.completion_tokens > 0
    text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny-chat", messages=MSGS, max_tokens=8, temperature=0, stream=True) if ch.choices)
    assert text == r.choices[0].message.content
    assert [m.id for m in c.models.list().data] == ["tiny-chat"]
    # Host routes pass their (checked) body through to the engine.
    tok = httpx.post(rep.url + "/tokenize", json={"prompt": "hello"})
    assert tok.status_code == 200 and tok.json()["count"] > 0
    assert httpx.post(rep.url + "/tokenize", content=b"[1, 2]").status_code == 400
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=MSGS)
    assert httpx.get(f"http://127.0.0.1:{child_port}/health/ready").status_code == 200
    rep.stop()
    # Stopping the replica stops its child engine too: nothing listens on the child's port any more.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{child_port}/health/ready")
