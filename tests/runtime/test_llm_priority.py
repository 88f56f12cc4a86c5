"""Priorities on a real LLM replica: x-ballast-priority (or the body's `priority`) reaches the engine, which
preempts low-priority work for an interactive request; every output equals the same request run alone."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from tests.runtime.test_llm_serving import llm_package

pytest.importorskip("ballast.engine", reason="the native engine is not built")


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def _body(prompt: list[int], max_tokens: int) -> dict:
    return {"model": "tiny-chat", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


LOW = [[11, 12, 13, 14, 15], [21, 22, 23, 24]]
HIGH = [31, 32, 33, 34, 35, 36]


@pytest.fixture(scope="module")
def two_slots(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import Replica

    pkg = llm_package(tmp_path_factory.mktemp("prio") / "tiny", tiny_checkpoint)
    text = pkg.joinpath("ballast.yaml").read_text().replace("max_num_seqs: 64", "max_num_seqs: 2")
    pkg.joinpath("ballast.yaml").write_text(text)
    rep = Replica(pkg)
    try:
        rep.wait_ready(180)
        yield rep
    finally:
        rep.stop()


async def _complete(client: httpx.AsyncClient, url: str, body: dict, priority: str | None = None) -> list[str]:
    headers = {"x-ballast-priority": priority} if priority is not None else {}
    r = await client.post(url + "/v1/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return [c["text"] for c in r.json()["choices"]]


def test_interactive_request_preempts_batch_work_and_outputs_stay_exact(two_slots):
    url = two_slots.url

    async def main() -> tuple[list[list[str]], list[str], float]:
        async with httpx.AsyncClient(timeout=120) as client:
            lows = [asyncio.create_task(_complete(client, url, _body(p, 400), "4")) for p in LOW]
            while _metric((await client.get(url + "/metrics")).text, "ballast_llm_requests_running") < 2:
                await asyncio.sleep(0.01)  # both slots taken by batch work
            high = await _complete(client, url, _body(HIGH, 8))  # no header: interactive, priority 0
            done_lows = [t.done() for t in lows]
            low_texts = [await t for t in lows]
            preemptions = _metric((await client.get(url + "/metrics")).text, "ballast_llm_preemptions")
            assert not any(done_lows)  # the interactive request did not wait for a slot to free up
            return low_texts, high, preemptions

    low_texts, high, preemptions = asyncio.run(main())
    assert preemptions >= 1

    async def alone() -> tuple[list[list[str]], list[str]]:
        async with httpx.AsyncClient(timeout=120) as client:
            return [await _complete(client, url, _body(p, 400)) for p in LOW], await _complete(client, url,
                                                                                                _body(HIGH, 8))

    alone_lows, alone_high = asyncio.run(alone())
    assert high == alone_high
    assert low_texts == alone_lows  # recompute after preemption kept every generated token


def test_priority_out_of_range_is_a_400(two_slots):
    for headers, extra in (({"x-ballast-priority": "9"}, {}), ({"x-ballast-priority": "high"}, {}),
                           ({}, {"priority": 7}), ({}, {"priority": -1})):
        r = httpx.post(two_slots.url + "/v1/completions", json={**_body(HIGH, 2), **extra}, headers=headers)
        assert r.status_code == 400, (headers, extra, r.text)
    r = httpx.post(two_slots.url + "/v1/completions", json={**_body(HIGH, 2), "priority": 3})
    assert r.status_code == 200
