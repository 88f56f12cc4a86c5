"""LoRA adapters on a real LLM replica: declared in ballast.yaml, chosen by `model`, listed with their parent,
loaded and unloaded at runtime (paths confined to the package and the model cache), under load."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from ballast.config.models import NativeEngineConfig
from ballast.engine import LLM, SamplingParams
from ballast.engine.tools.lora import make_lora
from tests.conftest import Replica, write_package

PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def pkg(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora") / "pkg"
    for i, name in enumerate(["sql", "extra", "churn"]):
        make_lora(tiny_checkpoint, root / "adapters" / name, rank=8, seed=i + 1)
    make_lora(tiny_checkpoint, root.parent / "outside", rank=4, seed=7)
    (root / "adapters" / "escape").symlink_to(root.parent / "outside")
    return write_package(root, f"""
        name: tiny
        engine:
          kind: native
          checkpoint: {tiny_checkpoint}
          served_model_name: tiny-chat
          max_model_len: 256
          kv_cache_memory: 32Mi
          max_loras: 2
          max_cpu_loras: 3
          adapters:
            sql: adapters/sql
        """)


@pytest.fixture(scope="module")
def rep(pkg: Path):
    r = Replica(pkg)
    try:
        r.wait_ready(180)
        yield r
    finally:
        r.stop()


def _complete(url: str, model: str, max_tokens: int = 8, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                                      "temperature": 0, "ignore_eos": True}, timeout=timeout)


def test_adapter_by_model_name_equals_engine(rep: Replica, pkg: Path, tiny_checkpoint: Path) -> None:
    models = httpx.get(f"{rep.url}/v1/models", timeout=30).json()["data"]
    assert {(m["id"], m.get("parent")) for m in models} >= {("tiny-chat", None), ("sql", "tiny-chat")}
    r = _complete(rep.url, "sql")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "sql"
    llm = LLM(str(tiny_checkpoint), adapters={"sql": str(pkg / "adapters" / "sql")})
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert r.json()["choices"][0]["text"] == llm.generate([PROMPT], params, lora="sql")[0].outputs[0].text
    base = _complete(rep.url, "tiny-chat").json()["choices"][0]["text"]
    assert base == llm.generate([PROMPT], params)[0].outputs[0].text != r.json()["choices"][0]["text"]
    missing = _complete(rep.url, "nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    metrics = httpx.get(f"{rep.url}/metrics", timeout=30).text
    assert re.search(r'^ballast_llm_adapter_requests_total\{adapter="sql"\} [1-9]', metrics, re.M)


def _load(url: str, name: str, path: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=60)


def _unload(url: str, name: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)


def test_load_and_unload_at_runtime(rep: Replica, pkg: Path) -> None:
    for name, path in [("x", "/etc"), ("x", "../outside"), ("x", str(pkg.parent / "outside")),
                       ("x", "adapters/escape"), ("x", "adapters/nothing-here"), ("a/b", "adapters/extra"),
                       ("tiny-chat", "adapters/extra"), ("sql", "adapters/extra")]:
        r = _load(rep.url, name, path)
        assert r.status_code == 400, (name, path, r.text)
        assert "x-request-id" in r.headers and "Traceback" not in r.text
    assert _complete(rep.url, "extra").status_code == 404
    r = _load(rep.url, "extra", "adapters/extra")
    assert r.status_code == 200, r.text
    assert _complete(rep.url, "extra").status_code == 200
    assert "extra" in {m["id"] for m in httpx.get(f"{rep.url}/v1/models", timeout=30).json()["data"]}
    assert _unload(rep.url, "extra").status_code == 200
    assert _complete(rep.url, "extra").status_code == 404
    assert _unload(rep.url, "extra").status_code == 404
    assert httpx.post(f"{rep.url}/v1/load_lora_adapter", content=b"{", timeout=30).status_code == 400


def test_load_unload_under_load_fails_no_request(rep: Replica) -> None:
    """Requests on the base, a declared adapter and one loaded for the run, while another adapter is loaded
    and unloaded again and again: every request succeeds (2 device slots, 3 in memory: slots churn too)."""
    assert _load(rep.url, "extra", "adapters/extra").status_code == 200

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=rep.url, timeout=120) as c:
            async def one(i: int) -> int:
                model = ["tiny-chat", "sql", "extra"][i % 3]
                body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
                return (await c.post("/v1/completions", json=body)).status_code

            async def churn() -> list[int]:
                codes = []
                for _ in range(4):
                    codes.append((await c.post("/v1/load_lora_adapter",
                                               json={"lora_name": "churn", "lora_path": "adapters/churn"})).status_code)
                    codes.append((await c.post("/v1/completions", json={"model": "churn", "prompt": PROMPT,
                                                                         "max_tokens": 4})).status_code)
                    codes.append((await c.post("/v1/unload_lora_adapter", json={"lora_name": "churn"})).status_code)
                return codes

            results = await asyncio.wait_for(asyncio.gather(churn(), *(one(i) for i in range(24))), 600)
            return [*results[0], *results[1:]]

    codes = asyncio.run(run())
    assert codes == [200] * len(codes), codes
    assert _unload(rep.url, "extra").status_code == 200


def test_config_refuses_paths_and_names_outside() -> None:
    for adapters in ({"a": "/abs/path"}, {"a": "../up"}, {"a@b": "x"}, {"a:1": "x"}, {"": "x"}):
        with pytest.raises(ValueError):
            NativeEngineConfig(checkpoint="c", adapters=adapters)
    with pytest.raises(ValueError):
        NativeEngineConfig(checkpoint="c", max_loras=8, max_cpu_loras=4)
    assert NativeEngineConfig(checkpoint="c", adapters={"sql-v2.1": "adapters/sql"}).adapters
