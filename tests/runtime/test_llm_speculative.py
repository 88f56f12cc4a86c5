"""Speculative decoding on a real LLM replica configured from ballast.yaml: the same greedy text as a replica
without it, the request's acceptance in its usage, the engine's in /metrics, and bad settings refused."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.runtime.test_llm_serving import llm_package

pytest.importorskip("ballast.engine", reason="the native engine is not built")

SPEC = "  speculative:\n    method: ngram\n    num_tokens: 4\n    adaptive: false\n"
PROMPT = [11, 12, 13, 14, 15, 16, 11, 12, 13, 14, 15, 16, 11, 12]


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def _package(root: Path, checkpoint: Path, spec: str) -> Path:
    pkg = llm_package(root, checkpoint)
    yaml = pkg / "ballast.yaml"
    yaml.write_text(yaml.read_text().replace("kv_cache_memory: 64Mi\n", "kv_cache_memory: 64Mi\n" + spec, 1))
    return pkg


def test_replica_speculates_with_the_same_output(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from tests.conftest import Replica

    body = {"model": "tiny-chat", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    texts, usages = [], []
    for name, spec in (("plain", ""), ("spec", SPEC)):
        rep = Replica(_package(tmp_path / name, tiny_checkpoint, spec))
        try:
            rep.wait_ready(180)
            r = httpx.post(rep.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
            usages.append(r.json()["usage"])
            metrics = httpx.get(rep.url + "/metrics", timeout=10).text
        finally:
            rep.stop()
    assert texts[0] == texts[1]
    assert "speculative" not in usages[0]
    mine = usages[1]["speculative"]
    assert mine["proposed_tokens"] > 0 and mine["tokens_per_step"] >= 1
    assert _metric(metrics, "ballast_llm_spec_proposed_tokens") == mine["proposed_tokens"]
    assert _metric(metrics, "ballast_llm_spec_accepted_tokens") == mine["accepted_tokens"]


def test_bad_speculative_settings_are_refused_at_load() -> None:
    from pydantic import ValidationError

    from ballast.config.models import NativeEngineConfig

    for bad in ({"method": "medusa"}, {"num_tokens": 0}, {"num_tokens": 4, "typo": 1}):
        with pytest.raises(ValidationError):
            NativeEngineConfig(checkpoint="x", speculative=bad)
    assert NativeEngineConfig(checkpoint="x").speculative is None  # off by default
