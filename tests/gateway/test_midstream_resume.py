"""Mid-stream resume against real LLM replicas (tiny checkpoint): SIGKILL the replica serving a greedy stream in the
middle, and the client still gets one whole stream, equal to an undisturbed run's, with one `[DONE]`.

The kill lands after the client has read the first content chunk, while the replica still has hundreds of tokens to
generate (`ignore_eos`); the gateway's `stream_resumed` counter proves the stream really moved.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from ballast.control.keys import KeyRecord
from ballast.gateway.routing import Endpoint
from ballast.gateway.service import DeploymentRoute, Gateway, VersionRoute
from ballast.store import hash_key
from tests.gateway.test_proxy_failover import GatewayServer, StaticSource
from tests.runtime.test_llm_serving import llm_package

pytest.importorskip("ballast.engine", reason="the native engine is not built")

KEY = "sk-test-inference"
TOKENS = 240
PROMPT = "Once upon a time"
CHAT = [{"role": "user", "content": "Tell me a long story about a cat."}]


def _replicas(replica_factory, tiny_checkpoint: Path, tmp_path: Path, n: int) -> list:
    pkg = llm_package(tmp_path / "tiny", tiny_checkpoint)
    reps = [replica_factory(pkg, ready=False) for _ in range(n)]
    for r in reps:
        r.wait_ready(180)
    return reps


def _gateway(reps: list, limit: int = 3) -> tuple[Gateway, CollectorRegistry]:
    eps = [Endpoint(replica_id=f"r{i}", url=r.url, version=1) for i, r in enumerate(reps)]
    route = DeploymentRoute(name="tiny", llm=True, versions={1: VersionRoute(1, eps, model_name="tiny-chat")},
                            environments={"production": [(1, 100)]}, prefix_routing=True, migration_limit=limit)
    src = StaticSource([KeyRecord(id="k1", key_hash=hash_key(KEY), scopes=frozenset({"inference"}))], {"tiny": route})
    registry = CollectorRegistry()
    return Gateway(src, registry), registry


def _stream(url: str, path: str, body: dict[str, Any], reps: list | None = None) -> tuple[list[str], str]:
    """(every SSE line, the replica that started the stream); with `reps`, that replica is SIGKILLed as soon as the
    first content arrives."""
    lines: list[str] = []
    killed = False
    with httpx.stream("POST", url + path, json=body, headers={"Api-Key": KEY}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        first = r.headers["x-ballast-replica"]
        for line in r.iter_lines():
            lines.append(line)
            content = ('"content":"' in line and '"content":""' not in line) or '"text":"' in line
            if reps is not None and not killed and content:
                os.killpg(reps[int(first[1:])].proc.pid, signal.SIGKILL)
                killed = True
    return lines, first


def _chunks(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(x[6:]) for x in lines if x.startswith("data: {")]


def _text(chunks: list[dict[str, Any]]) -> str:
    return "".join((c.get("delta") or {}).get("content") or c.get("text") or "" for ch in chunks
                   for c in ch["choices"])


def _resumed(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("ballast_gateway_stream_resumed_total", {"deployment": "tiny"}) or 0.0


def _check_one_stream(lines: list[str], undisturbed: list[str]) -> None:
    got, want = _chunks(lines), _chunks(undisturbed)
    assert _text(got) == _text(want) and len(_text(got)) > 0
    assert lines.count("data: [DONE]") == 1 and [x for x in lines if x][-1] == "data: [DONE]"
    assert "event: error" not in lines and not any(x.startswith(":") for x in lines)  # reports stripped
    assert len({(c["id"], c["created"], c["model"]) for c in got}) == 1
    assert got[-1]["usage"] == want[-1]["usage"]  # the whole answer, counted once
    assert got[-1]["usage"]["completion_tokens"] == TOKENS
    finishes = [c["finish_reason"] for ch in got for c in ch["choices"] if c.get("finish_reason")]
    assert finishes == ["length"]


def test_greedy_streams_survive_a_sigkill_mid_answer(replica_factory, tiny_checkpoint, tmp_path):
    reps = _replicas(replica_factory, tiny_checkpoint, tmp_path, 3)
    gateway, registry = _gateway(reps)
    common = {"model": "tiny", "stream": True, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
              "stream_options": {"include_usage": True}}
    with GatewayServer(gateway) as gw:
        # Completions: prompt + text so far.
        body = {**common, "prompt": PROMPT}
        undisturbed, _ = _stream(gw.url, "/v1/completions", body)
        lines, victim = _stream(gw.url, "/v1/completions", body, reps)
        assert reps[int(victim[1:])].proc.wait(10) == -signal.SIGKILL
        _check_one_stream(lines, undisturbed)
        assert _resumed(registry) == 1

        # Chat: the partial answer continues as an open assistant message; one role chunk.
        body = {**common, "messages": CHAT}
        undisturbed, _ = _stream(gw.url, "/v1/chat/completions", body)
        lines, victim = _stream(gw.url, "/v1/chat/completions", body, reps)
        assert reps[int(victim[1:])].proc.wait(10) == -signal.SIGKILL
        _check_one_stream(lines, undisturbed)
        assert sum("role" in (c.get("delta") or {}) for ch in _chunks(lines) for c in ch["choices"]) == 1
        assert _resumed(registry) == 2

        # Without include_usage the client gets no usage chunk, resumed or not; metering still has it.
        body = {**common, "prompt": PROMPT, "stream_options": None}
        lines, _ = _stream(gw.url, "/v1/completions", body)
        assert all(c.get("usage") is None for c in _chunks(lines)) and _text(_chunks(lines))
    metered = [counts for batch in gateway.source.usage for counts in batch.values()]  # type: ignore[attr-defined]
    assert sum(c.completion_tokens for c in metered) == 5 * TOKENS  # each answer once, resumed ones included


def test_unfaithful_resumes_and_the_migration_limit_end_with_the_error_event(replica_factory, tiny_checkpoint,
                                                                              tmp_path):
    reps = _replicas(replica_factory, tiny_checkpoint, tmp_path, 3)
    common = {"model": "tiny", "stream": True, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}

    # A replica continues a partial assistant message itself (vLLM's continue_final_message).
    chat = {"model": "tiny-chat", "max_tokens": 8, "temperature": 0,
            "messages": [*CHAT, {"role": "assistant", "content": "Once"}], "continue_final_message": True,
            "add_generation_prompt": False}
    r = httpx.post(reps[0].url + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    r = httpx.post(reps[0].url + "/v1/chat/completions", json={**chat, "add_generation_prompt": True}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "add_generation_prompt"
    r = httpx.post(reps[0].url + "/v1/chat/completions", json={**chat, "ballast_resume": {"token_ids": [1, 2]}},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "ballast_resume"

    gateway, registry = _gateway(reps, limit=3)
    with GatewayServer(gateway) as gw:
        # n=2 cannot be continued faithfully: the stream ends with the error event, as without resume.
        lines, _ = _stream(gw.url, "/v1/completions", {**common, "prompt": PROMPT, "n": 2}, reps)
        assert "event: error" in lines and "data: [DONE]" not in lines
        assert '"code":"stream_interrupted"' in lines[-2] + lines[-1]
    assert _resumed(registry) == 0

    gateway, registry = _gateway([r for r in reps if r.proc.poll() is None], limit=0)
    with GatewayServer(gateway) as gw:
        # migration_limit 0: another replica is alive, but the stream may not move.
        lines, _ = _stream(gw.url, "/v1/completions", {**common, "prompt": PROMPT}, gateway_reps(gateway, reps))
        assert "event: error" in lines and "data: [DONE]" not in lines
    assert _resumed(registry) == 0


def gateway_reps(gateway: Gateway, reps: list) -> list:
    """The replicas in the order the gateway's route numbers them (r0, r1, ...)."""
    route = gateway.source.routes["tiny"]  # type: ignore[attr-defined]
    by_url = {r.url: r for r in reps}
    return [by_url[ep.url] for ep in route.versions[1].endpoints]
