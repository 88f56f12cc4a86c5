"""LoRA adapters through a real `ballast up`: adapter names as `model` (with @env, :version and the
deployment/adapter form), /v1/models with parents, adapter affinity across two replicas, runtime load and
unload (admin scope) fanned out to the replicas, and per-adapter metrics."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from ballast.engine.tools.lora import make_lora
from tests.conftest import write_package
from tests.control.platform import Platform, kill_leftovers

pytest.importorskip("ballast.engine", reason="the native engine is not built")

PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def plat(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    root = tmp_path_factory.mktemp("gwlora")
    chat = root / "chat"
    make_lora(tiny_checkpoint, chat / "adapters" / "sql", rank=8, seed=1)
    make_lora(tiny_checkpoint, chat / "adapters" / "extra", rank=8, seed=2)
    write_package(chat, f"""
        name: chat
        engine:
          kind: native
          checkpoint: {tiny_checkpoint}
          max_model_len: 256
          kv_cache_memory: 32Mi
          adapters: {{sql: adapters/sql}}
        autoscaling: {{min_replicas: 2, max_replicas: 2}}
        """)
    p = Platform(root / "home").start()
    try:
        p.api("POST", "/deployments", expect=201, json={"path": str(chat)})
        p.wait_serving("chat", 1, timeout=180)
        p.wait("2 ready replicas", lambda: sum(r["state"] == "ready" for r in p.show("chat")["replicas"]) == 2,
               timeout=180)
        yield p
    finally:
        pids = p.replica_pids() if p.proc and p.proc.poll() is None else []
        p.stop()
        kill_leftovers(pids)


def _post(p: Platform, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
    return httpx.post(p.url + path, headers={"Authorization": f"Bearer {key or p.key}"}, timeout=120, **kw)


def _complete(p: Platform, model: str) -> httpx.Response:
    return _post(p, "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                              "ignore_eos": True})


def _adapter_requests(p: Platform, adapter: str) -> dict[str, float]:
    out = {}
    for r in p.show("chat")["replicas"]:
        text = httpx.get(r["url"] + "/metrics", timeout=10).text
        m = re.search(rf'^ballast_llm_adapter_requests_total{{adapter="{adapter}"}} ([0-9.e+]+)$', text, re.M)
        out[r["id"]] = float(m[1]) if m else 0.0
    return out


def test_adapter_names_resolve_and_stick_to_one_replica(plat: Platform) -> None:
    before = _adapter_requests(plat, "sql")
    texts = set()
    for model in ("sql", "sql@production", "sql:1", "chat/sql", "chat/sql@production", "sql", "sql"):
        r = _complete(plat, model)
        assert r.status_code == 200, (model, r.text)
        texts.add(r.json()["choices"][0]["text"])
    assert len(texts) == 1
    base = _complete(plat, "chat")
    assert base.status_code == 200 and base.json()["choices"][0]["text"] not in texts
    after = _adapter_requests(plat, "sql")
    served = {rid: after[rid] - before.get(rid, 0) for rid in after}
    assert sorted(served.values()) == [0, 7], f"an adapter's requests were spread over replicas: {served}"
    for model in ("nope", "chat/nope", "sql:9", "sql@nowhere"):
        r = _complete(plat, model)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (model, r.text)
    models = httpx.get(plat.url + "/v1/models", headers={"Authorization": f"Bearer {plat.key}"}, timeout=30).json()
    assert {"id": "sql", "object": "model", "created": 0, "owned_by": "ballast", "parent": "chat"} in models["data"]
    metrics = httpx.get(plat.url + "/metrics", headers={"Authorization": f"Bearer {plat.key}"}, timeout=30).text
    assert re.search(r'^ballast_gateway_adapter_requests_total\{adapter="sql",deployment="chat",status="200"\} 7',
                     metrics, re.M), metrics[-2000:]


def test_runtime_load_and_unload_through_the_gateway(plat: Platform) -> None:
    body = {"model": "chat", "lora_name": "extra", "lora_path": "adapters/extra"}
    inference = plat.api("POST", "/keys", expect=201, json={"scopes": ["inference"]})["key"]
    r = _post(plat, "/v1/load_lora_adapter", key=inference, json=body)
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    assert _complete(plat, "extra").status_code == 404
    r = _post(plat, "/v1/load_lora_adapter", json={**body, "lora_path": "/etc"})
    assert r.status_code == 400 and "outside" in r.json()["error"]["message"]
    r = _post(plat, "/v1/load_lora_adapter", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["replicas"]) == 2
    assert _complete(plat, "extra").status_code == 200
    assert _complete(plat, "chat/extra:1").status_code == 200
    r = _post(plat, "/v1/unload_lora_adapter", json={"model": "chat", "lora_name": "extra"})
    assert r.status_code == 200, r.text
    assert _complete(plat, "extra").status_code == 404
