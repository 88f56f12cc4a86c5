"""A chain deployed on a real `ballast up`: one deployment per step, hops through the gateway, same results."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ballast.chains import ChainError, LocalChain, find_entry, load_module
from ballast.chains.remote import decode_error, envelope
from tests.chains.test_local import PIPELINE
from tests.control.platform import Platform

SHOUT = textwrap.dedent('''
    import asyncio

    from pydantic import BaseModel

    from ballast.chains import Chainlet, ChainletConfig, depends, entrypoint


    class Loud(BaseModel):
        text: str
        words: int


    class UpperWord(Chainlet):
        config = ChainletConfig(idempotent=True)

        async def run(self, word: str) -> str:
            if word == "zzz":
                await asyncio.sleep(3600)
            if word == "boom":
                raise ValueError("cannot shout boom")
            return word.upper()


    @entrypoint
    class Shout(Chainlet):
        def __init__(self, upper=depends(UpperWord, retries=1, timeout_s=30)):
            self.upper = upper

        async def run(self, text: str) -> Loud:
            if text == "zzz":
                return Loud(text=await self.upper.run(text), words=1)
            words = await self.upper.map(text.split(), concurrency=4)
            return Loud(text=" ".join(words), words=len(words))
''')


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    p = Platform(tmp_path_factory.mktemp("home")).start()
    yield p
    p.stop()


def _local(path: Path, inputs: dict, request_id: str = "local") -> object:
    chain = LocalChain(find_entry(load_module(path)))
    return asyncio.run(chain.call(inputs, request_id=request_id))


def _run(p: Platform, route: str, inputs: dict, request_id: str = "", key: str | None = None,
         **headers: str) -> httpx.Response:
    h = {"Authorization": f"Bearer {key or p.key}", **headers}
    if request_id:
        h["x-request-id"] = request_id
    return httpx.post(f"{p.url}/chains/{route}", json=inputs, timeout=60, headers=h)


def _deploy(p: Platform, path: Path, name: str, out: Path) -> str:
    return p.cli("chains", "deploy", str(path), "--name", name, "--out", str(out), "--timeout", "120").stdout


@pytest.mark.slow
def test_a_deployed_chain_gives_the_local_output(platform: Platform, tmp_path: Path) -> None:
    out = _deploy(platform, PIPELINE, "demo", tmp_path / "pkgs")
    assert "demo-pipeline" in out and "demo-embed" in out and "demo-split" in out
    assert "chain demo version 1 serves production" in out
    inputs = {"text": "banana apple kiwi"}
    expected = _local(PIPELINE, inputs).model_dump(mode="json")  # type: ignore[attr-defined]
    for route in ("demo/run", "demo/environments/production/run", "demo/versions/1/run"):
        r = _run(platform, route, inputs, "req-d1")
        assert r.status_code == 200, r.text
        assert r.json() == expected
        assert r.headers["x-request-id"] == "req-d1"

    # Deploying the unchanged chain again reuses every step version and the chain version.
    again = _deploy(platform, PIPELINE, "demo", tmp_path / "pkgs")
    assert again.count("version 1 ready") == 3 and "version 1 (unchanged: reused)" in again, again
    chain = platform.api("GET", "/chains/demo")
    assert [v["version"] for v in chain["versions"]] == [1]
    assert chain["versions"][0]["entry"] == "demo-pipeline"
    assert {s["deployment"]: s["version"] for s in chain["versions"][0]["steps"]} == {
        "demo-split": 1, "demo-embed": 1, "demo-pipeline": 1}
    assert chain["environments"][0]["name"] == "production" and chain["environments"][0]["version"] == 1


@pytest.mark.slow
def test_the_chain_route_checks_keys_and_names(platform: Platform, tmp_path: Path) -> None:
    _deploy(platform, PIPELINE, "demo", tmp_path / "pkgs")
    assert _run(platform, "demo/run", {"text": "a"}, key="bk_nope").status_code == 401
    other = platform.api("POST", "/keys", json={"name": "other", "scopes": ["inference"],
                                                "deployments": ["demo-split"]}, expect=201)["key"]
    denied = _run(platform, "demo/run", {"text": "a"}, key=other)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "deployment_not_allowed"
    missing = _run(platform, "nope/run", {"text": "a"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "chain_not_found"
    assert _run(platform, "demo/versions/9/run", {"text": "a"}).status_code == 404
    assert _run(platform, "demo/environments/staging/run", {"text": "a"}).status_code == 404
    bad = httpx.post(f"{platform.url}/chains/demo/run", content=b"[1, 2", timeout=30,
                     headers={"Authorization": f"Bearer {platform.key}"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json" and bad.headers["x-request-id"]
    wrong = _run(platform, "demo/run", {"txt": "a"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "Pipeline", wrong.text
    assert wrong.json()["error"]["code"] == "chain_contract" and "'text'" in wrong.json()["error"]["message"]
    late = _run(platform, "demo/run", {"text": "a"}, **{"x-ballast-deadline": "-1"})
    assert late.status_code == 400 and late.json()["error"]["param"] == "x-ballast-deadline"


@pytest.mark.slow
def test_a_deployed_chain_fails_like_the_local_one(platform: Platform, tmp_path: Path) -> None:
    chain_file = tmp_path / "shout.py"
    chain_file.write_text(SHOUT)
    _deploy(platform, chain_file, "loud", tmp_path / "pkgs")
    ok = _run(platform, "loud/run", {"text": "hi there"}, "req-ok")
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"text": "HI THERE", "words": 2}

    with pytest.raises(ChainError) as local:
        _local(chain_file, {"text": "big boom"}, request_id="req-e1")
    r = _run(platform, "loud/run", {"text": "big boom"}, "req-e1")
    remote = decode_error(r.status_code, r.json(), "Shout", "req-e1")
    assert (remote.step, remote.kind, remote.message) == ("UpperWord", "error", "ValueError: cannot shout boom")
    assert str(remote) == str(local.value)

    # A caller's deadline crosses the hop; running out names the step that was running.
    late = _run(platform, "loud/run", {"text": "zzz"}, "req-late", **{"x-ballast-deadline": "0.5"})
    err = decode_error(late.status_code, late.json(), "Shout", "req-late")
    assert late.status_code == 504 and (err.step, err.kind) == ("UpperWord", "deadline"), late.text
    # The same through the envelope a client may send itself.
    late = _run(platform, "loud/run", envelope({"text": "zzz"}, "req-late2", 0.5))
    assert decode_error(late.status_code, late.json(), "Shout", "req-late2").step == "UpperWord"


def _gateway_requests(p: Platform, deployment: str) -> float:
    text = httpx.get(f"{p.url}/metrics", headers={"Authorization": f"Bearer {p.key}"}, timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ballast_gateway_requests_total{") and f'deployment="{deployment}"' in line)


@pytest.mark.slow
def test_calls_between_steps_go_straight_to_the_steps_replicas(platform: Platform, tmp_path: Path) -> None:
    _deploy(platform, PIPELINE, "demo", tmp_path / "pkgs")
    for _ in range(3):  # the entry's replica asks the gateway where the steps' replicas are (in the background)
        assert _run(platform, "demo/run", {"text": "kiwi"}).status_code == 200
    platform.wait("the entry to know its steps' replicas", lambda: _bypasses_the_gateway(platform), timeout=30)
    entry, embed = _gateway_requests(platform, "demo-pipeline"), _gateway_requests(platform, "demo-embed")
    for _ in range(5):
        assert _run(platform, "demo/run", {"text": "banana apple kiwi"}).status_code == 200
    # The gateway saw the five calls to the entry (metered there), and none of the calls between steps.
    assert _gateway_requests(platform, "demo-pipeline") == entry + 5
    assert _gateway_requests(platform, "demo-embed") == embed


def _bypasses_the_gateway(p: Platform) -> bool:
    """Whether one more run of the chain left demo-embed's count at the gateway as it was."""
    before = _gateway_requests(p, "demo-embed")
    assert _run(p, "demo/run", {"text": "b"}).status_code == 200
    return _gateway_requests(p, "demo-embed") == before
