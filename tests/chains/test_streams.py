"""Deployed steps that stream: items cross every hop as they come, errors mid-stream name the step, a client that
leaves stops the step's generator, and the caller's deadline reaches it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from ballast.chains import LocalChain, find_entry, load_module
from ballast.chains.remote import decode_error
from tests.control.platform import Platform

CHAIN = textwrap.dedent('''
    import asyncio
    import os
    from collections.abc import AsyncIterator
    from pathlib import Path

    from pydantic import BaseModel

    from ballast.chains import Chainlet, ChainletConfig, depends, entrypoint

    MARKS = Path(MARKS_DIR)


    class Word(BaseModel):
        text: str
        index: int


    class Words(Chainlet):
        config = ChainletConfig(idempotent=True)

        async def run(self, text: str) -> AsyncIterator[Word]:
            for i, w in enumerate(text.split()):
                if w == "boom":
                    raise ValueError("cannot say boom")
                if w.startswith("wait-"):  # hold the stream until the test says go
                    while not (MARKS / w).exists():
                        await asyncio.sleep(0.05)
                if w.startswith("sleep-"):
                    (MARKS / f"{w}.started").touch()
                    try:
                        await asyncio.sleep(120)
                    except asyncio.CancelledError:
                        (MARKS / f"{w}.cancelled").touch()
                        raise
                    (MARKS / f"{w}.finished").touch()
                if w.startswith("kill-"):  # the first try waits to be killed; a second one goes on at once
                    with open(MARKS / f"{w}.started", "a") as f:
                        f.write(f"{os.getpid()}\\n")
                    if len((MARKS / f"{w}.started").read_text().split()) == 1:
                        await asyncio.sleep(120)
                yield Word(text=w, index=i)


    @entrypoint
    class Shout(Chainlet):
        def __init__(self, words=depends(Words, retries=3)):
            self.words = words

        async def run(self, text: str) -> AsyncIterator[Word]:
            async for w in self.words.run(text):
                yield Word(text=w.text.upper(), index=w.index)
''')


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Platform, Path, Path]]:
    home = tmp_path_factory.mktemp("home")
    marks = tmp_path_factory.mktemp("marks")
    chain = home / "shout.py"
    chain.write_text(CHAIN.replace("MARKS_DIR", repr(str(marks))))
    p = Platform(home).start()
    try:
        p.cli("chains", "deploy", str(chain), "--name", "sh", "--out", str(home / "pkgs"), "--timeout", "120")
        yield p, marks, chain
    finally:
        p.stop()


async def _events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    event = ""
    async for line in lines:
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            yield event, line[5:].strip()
            event = ""


def _post(client: httpx.AsyncClient, p: Platform, text: str, **headers: str) -> httpx.Request:
    return client.build_request("POST", f"{p.url}/chains/sh/run", json={"text": text},
                                headers={"Authorization": f"Bearer {p.key}", **headers})


@pytest.mark.slow
def test_a_deployed_stream_arrives_item_by_item_and_matches_the_local_run(
        deployed: tuple[Platform, Path, Path]) -> None:
    p, marks, chain = deployed
    text = "one two wait-s1 three"
    local = LocalChain(find_entry(load_module(chain)))

    async def run() -> list[dict]:
        expected = [w.model_dump() async for w in local.stream({"text": text.replace("wait-s1", "x")})]
        got: list[dict] = []
        async with httpx.AsyncClient(timeout=60) as client:
            r = await client.send(_post(client, p, text), stream=True)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            async for event, data in _events(r.aiter_lines()):
                assert event == "", data
                got.append(json.loads(data))
                if len(got) == 2:  # the third item waits for this: the first two came before the stream ended
                    (marks / "wait-s1").touch()
            await r.aclose()
        expected[2]["text"] = "WAIT-S1"
        assert got == expected
        return got

    assert [w["text"] for w in asyncio.run(run())] == ["ONE", "TWO", "WAIT-S1", "THREE"]


@pytest.mark.slow
def test_an_error_mid_stream_is_one_error_naming_the_step(deployed: tuple[Platform, Path, Path]) -> None:
    p, _marks, _chain = deployed

    async def run() -> tuple[list[dict], list[str]]:
        items, errors = [], []
        async with httpx.AsyncClient(timeout=60) as client:
            r = await client.send(_post(client, p, "fine boom never", **{"x-request-id": "req-s1"}), stream=True)
            async for event, data in _events(r.aiter_lines()):
                (errors if event == "error" else items).append(data if event == "error" else json.loads(data))
            await r.aclose()
        return items, errors

    items, errors = asyncio.run(run())
    assert items == [{"text": "FINE", "index": 0}] and len(errors) == 1
    err = decode_error(500, json.loads(errors[0]), "Shout", "req-s1")
    assert (err.step, err.kind, err.message) == ("Words", "error", "ValueError: cannot say boom"), errors
    # Before the first item an error is a plain HTTP error (and contract errors name the step and field).
    bad = httpx.post(f"{p.url}/chains/sh/run", json={"txt": "a"}, headers={"Authorization": f"Bearer {p.key}"},
                     timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Shout" and "'text'" in bad.text


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_stops_the_steps_generator(deployed: tuple[Platform, Path, Path]) -> None:
    p, marks, _chain = deployed

    async def call_and_leave() -> list[str]:
        got = []
        async with httpx.AsyncClient(timeout=60) as client:
            r = await client.send(_post(client, p, "first sleep-c1 never"), stream=True)
            async for _event, data in _events(r.aiter_lines()):
                got.append(json.loads(data)["text"])
                break  # the first item is in; the step now sleeps before the next
            await asyncio.wait_for(_until(marks / "sleep-c1.started"), 30)
            await r.aclose()  # the client goes away mid-stream
        return got

    assert asyncio.run(call_and_leave()) == ["FIRST"]
    asyncio.run(asyncio.wait_for(_until(marks / "sleep-c1.cancelled"), 30))
    assert not (marks / "sleep-c1.finished").exists()
    assert p.api("GET", "/deployments/sh-words/logs", params={"tail": 200}).count("step Words cancelled") >= 1


@pytest.mark.slow
def test_the_deadline_reaches_a_streaming_step(deployed: tuple[Platform, Path, Path]) -> None:
    p, marks, _chain = deployed
    r = httpx.post(f"{p.url}/chains/sh/run", json={"text": "sleep-d1"}, timeout=60,
                   headers={"Authorization": f"Bearer {p.key}", "x-ballast-deadline": "1"})
    err = decode_error(r.status_code, r.json(), "Shout", "")
    assert r.status_code == 504 and (err.step, err.kind) == ("Words", "deadline"), r.text
    asyncio.run(asyncio.wait_for(_until(marks / "sleep-d1.cancelled"), 30))


def _kill_and_read(p: Platform, marks: Path, text: str, word: str) -> tuple[list[str], list[str]]:
    """Stream `text`, kill -9 the replica running `word` once it has started, and return the items and errors."""

    async def run() -> tuple[list[str], list[str]]:
        items, errors = [], []
        async with httpx.AsyncClient(timeout=90) as client:
            killed = asyncio.create_task(_kill(marks / f"{word}.started"))  # (the answer starts with the first item)
            r = await client.send(_post(client, p, text), stream=True)
            async for event, data in _events(r.aiter_lines()):
                (errors if event == "error" else items).append(data if event == "error" else json.loads(data)["text"])
            await r.aclose()
            await killed
        return items, errors

    return asyncio.run(asyncio.wait_for(run(), 90))


async def _kill(marker: Path) -> None:
    await asyncio.wait_for(_until(marker), 30)
    os.kill(int(marker.read_text().split()[0]), signal.SIGKILL)


@pytest.mark.slow
def test_a_stream_is_retried_before_its_first_item_never_after(deployed: tuple[Platform, Path, Path]) -> None:
    p, marks, _chain = deployed
    # Killed before its first item: nothing reached the caller, and Words is idempotent: tried again.
    items, errors = _kill_and_read(p, marks, "kill-k1 b", "kill-k1")
    assert (items, errors) == (["KILL-K1", "B"], []), errors
    assert len((marks / "kill-k1.started").read_text().split()) == 2
    # Killed after its first item: never sent again; the stream ends with one error naming the step.
    items, errors = _kill_and_read(p, marks, "a kill-k2 c", "kill-k2")
    assert items == ["A"] and len(errors) == 1, (items, errors)
    err = decode_error(500, json.loads(errors[0]), "Shout", "")
    assert (err.step, err.kind) == ("Words", "error") and "StepUnavailable" in err.message, errors
    assert len((marks / "kill-k2.started").read_text().split()) == 1


async def _until(path: Path) -> None:
    while not path.exists():
        await asyncio.sleep(0.05)
