"""Traces end to end: a real `ballast up` with OTEL_EXPORTER_OTLP_ENDPOINT pointing at a real loopback OTLP/HTTP
receiver, real replica processes (a tiny Llama on the native engine, and a Python model that logs), real
requests. One trace id spans the gateway, the replica and the engine's phases; attributes follow the GenAI
semantic conventions; the request id is on the spans and the trace id on the replica's log lines.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.control.platform import Platform
from tests.observe.otlp_receiver import OTLPReceiver

pytest.importorskip("ballast.engine", reason="the native engine is not built")

def _post(p: Platform, path: str, body: dict[str, Any], rid: str) -> httpx.Response:
    r = httpx.post(p.url + path, json=body, timeout=60,
                   headers={"Authorization": f"Bearer {p.key}", "x-request-id": rid})
    assert r.status_code == 200, r.text
    return r


def _trace_of(receiver: OTLPReceiver, rid: str, services: set[str], names: set[str]) -> list[dict[str, Any]]:
    """The spans of the trace whose gateway span carries request id `rid`, once all `names` have arrived."""

    def ready(spans: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        roots = [s for s in spans if s["attributes"].get("ballast.request_id") == rid and s["service"] ==
                 "ballast-gateway"]
        if not roots:
            return None
        trace = [s for s in spans if s["trace_id"] == roots[0]["trace_id"]]
        have = {s["name"].split(" ")[0] for s in trace} | {s["name"] for s in trace}
        return trace if names <= have and services <= {s["service"] for s in trace} else None

    return receiver.wait_for(f"the trace of {rid}", ready)


def _one(spans: list[dict[str, Any]], service: str, name: str) -> dict[str, Any]:
    found = [s for s in spans if s["service"] == service and (s["name"] == name or s["name"].startswith(name + " "))]
    assert len(found) == 1, (service, name, [(s["service"], s["name"]) for s in spans])
    return found[0]


ENGINE = {"ballast.engine", "ballast.engine.queue_wait", "ballast.engine.prefill", "ballast.engine.decode"}


@pytest.mark.parametrize("stream", [False, True])
def test_one_trace_spans_gateway_replica_and_engine(plat: Platform, receiver: OTLPReceiver, stream: bool) -> None:
    rid = f"trace-chat-{stream}"
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 6,
            "temperature": 0.5, "stream": stream, "stream_options": {"include_usage": True} if stream else None,
            "ignore_eos": True}
    r = _post(plat, "/v1/chat/completions", {k: v for k, v in body.items() if v is not None}, rid)
    if stream:
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        usage, response_id = chunks[-1]["usage"], chunks[0]["id"]
    else:
        usage, response_id = r.json()["usage"], r.json()["id"]
    spans = _trace_of(receiver, rid, {"ballast-gateway", "ballast-replica"}, {"chat", *ENGINE})
    assert len({s["trace_id"] for s in spans}) == 1
    gw = _one(spans, "ballast-gateway", "chat")
    rep = _one(spans, "ballast-replica", "chat")
    engine = _one(spans, "ballast-replica", "ballast.engine")
    assert gw["parent_id"] == "" and rep["parent_id"] == gw["span_id"] and engine["parent_id"] == rep["span_id"]
    for phase in ("queue_wait", "prefill", "decode"):
        child = _one(spans, "ballast-replica", f"ballast.engine.{phase}")
        assert child["parent_id"] == engine["span_id"]
        assert engine["start"] <= child["start"] <= child["end"] <= engine["end"]
    # Phases follow each other, inside the engine's span, inside the replica's, which the gateway's started.
    q, pf, dec = (_one(spans, "ballast-replica", f"ballast.engine.{p}") for p in ("queue_wait", "prefill", "decode"))
    assert q["end"] == pf["start"] and pf["end"] == dec["start"]
    # (The replica's span may end a little after the gateway's: it ends once its last write returned.)
    timeline = [(s["name"], s["start"] - gw["start"], s["end"] - gw["start"]) for s in spans]
    assert gw["start"] <= rep["start"] <= engine["start"] and engine["end"] <= rep["end"], timeline
    for span in (gw, rep):
        a = span["attributes"]
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "ballast"
        assert a["gen_ai.request.model"] == "chat"
        assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
        assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 6
        assert a["ballast.request_id"] == rid
        assert a["http.response.status_code"] == 200
    a = rep["attributes"]
    assert a["gen_ai.response.id"] == response_id
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["gen_ai.request.temperature"] == 0.5 and a["gen_ai.request.max_tokens"] == 6
    assert gw["attributes"]["ballast.deployment"] == "chat" and gw["attributes"]["ballast.version"] == 1
    assert rep["resource"]["service.instance.id"] == gw["attributes"]["ballast.replica"]
    assert engine["attributes"]["gen_ai.usage.output_tokens"] == 6


def test_the_request_id_links_the_replica_log_line_to_its_trace(plat: Platform, receiver: OTLPReceiver) -> None:
    rid = "trace-predict-1"
    _post(plat, "/deployments/echo/predict", {"x": 1}, rid)
    spans = _trace_of(receiver, rid, {"ballast-gateway", "ballast-replica"}, {"predict"})
    rep = _one(spans, "ballast-replica", "POST")
    assert rep["attributes"]["ballast.request_id"] == rid
    trace_id = rep["trace_id"]

    def logged() -> str | None:
        text = plat.api("GET", "/deployments/echo/logs", params={"tail": 200})
        lines = [ln for ln in str(text).splitlines() if "predicting" in ln and rid in ln]
        return lines[0] if lines else None

    line = plat.wait("the replica's log line", logged, timeout=30, every=0.2)
    assert f"[{rid} trace={trace_id}]" in line


def test_probes_and_scrapes_are_not_traced(plat: Platform, receiver: OTLPReceiver) -> None:
    """Only inference (POST) is traced: health probes and /metrics scrapes every second would drown it."""
    rep = plat.show("chat")["replicas"][0]["url"]
    for _ in range(3):
        assert httpx.get(rep + "/health/ready", timeout=10).status_code == 200
        assert httpx.get(rep + "/metrics", timeout=10).status_code == 200
    receiver.wait_for("any span", lambda spans: spans)
    assert not [s for s in receiver.spans() if "health" in s["name"] or "metrics" in s["name"]]


def test_a_request_without_an_id_gets_one_id_on_its_answer_and_both_spans(plat: Platform,
                                                                          receiver: OTLPReceiver) -> None:
    r = httpx.post(plat.url + "/deployments/echo/predict", json={"x": 2}, timeout=60,
                   headers={"Authorization": f"Bearer {plat.key}"})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    spans = _trace_of(receiver, rid, {"ballast-gateway", "ballast-replica"}, {"predict"})
    assert {s["attributes"]["ballast.request_id"] for s in spans} == {rid}
