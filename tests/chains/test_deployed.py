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


def _predict(p: Platform, deployment: str, inputs: dict, request_id: str) -> httpx.Response:
    return httpx.post(f"{p.url}/deployments/{deployment}/predict", json=inputs, timeout=60,
                      headers={"Authorization": f"Bearer {p.key}", "x-request-id": request_id})


@pytest.mark.slow
def test_a_deployed_chain_gives_the_local_output(platform: Platform, tmp_path: Path) -> None:
    out = platform.cli("chains", "deploy", str(PIPELINE), "--name", "demo", "--out", str(tmp_path / "pkgs"),
                       "--timeout", "120").stdout
    assert "demo-pipeline" in out and "demo-embed" in out and "demo-split" in out
    inputs = {"text": "banana apple kiwi"}
    r = _predict(platform, "demo-pipeline", inputs, "req-d1")
    assert r.status_code == 200, r.text
    assert r.json() == _local(PIPELINE, inputs).model_dump(mode="json")  # type: ignore[attr-defined]

    # Deploying the unchanged chain again reuses its key, hence identical packages and the same versions.
    again = platform.cli("chains", "deploy", str(PIPELINE), "--name", "demo", "--out", str(tmp_path / "pkgs"),
                         "--timeout", "120").stdout
    assert again.count("version 1 ready") == 3, again
    assert len([k for k in platform.api("GET", "/keys")["data"] if k["name"] == "chain demo"]) == 1


@pytest.mark.slow
def test_a_deployed_chain_fails_like_the_local_one(platform: Platform, tmp_path: Path) -> None:
    chain_file = tmp_path / "shout.py"
    chain_file.write_text(SHOUT)
    platform.cli("chains", "deploy", str(chain_file), "--name", "loud", "--out", str(tmp_path / "pkgs"),
                 "--timeout", "120")
    ok = _predict(platform, "loud-shout", {"text": "hi there"}, "req-ok")
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"text": "HI THERE", "words": 2}

    with pytest.raises(ChainError) as local:
        _local(chain_file, {"text": "big boom"}, request_id="req-e1")
    r = _predict(platform, "loud-shout", {"text": "big boom"}, "req-e1")
    remote = decode_error(r.status_code, r.json(), "Shout", "req-e1")
    assert (remote.step, remote.kind, remote.message) == ("UpperWord", "error", "ValueError: cannot shout boom")
    assert str(remote) == str(local.value)

    # A caller's deadline (sent in the envelope) crosses the hop; running out names the step that was running.
    late = httpx.post(f"{platform.url}/deployments/loud-shout/predict", timeout=60,
                      headers={"Authorization": f"Bearer {platform.key}"},
                      json=envelope({"text": "zzz"}, "req-late", 0.5))
    err = decode_error(late.status_code, late.json(), "Shout", "req-late")
    assert (err.step, err.kind) == ("UpperWord", "deadline"), late.text
