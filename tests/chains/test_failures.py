"""A deployed chain when things go wrong: a client that leaves cancels the whole tree, and a step's replica killed
mid-run is retried when the step is idempotent, else reported as one error naming the step."""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ballast.chains.remote import decode_error
from tests.control.platform import Platform

CHAIN = textwrap.dedent('''
    import asyncio
    import os
    from pathlib import Path

    from ballast.chains import Chainlet, ChainletConfig, depends, entrypoint

    MARKS = Path(MARKS_DIR)


    async def work(name: str, seconds: float) -> None:
        """Sleep in small steps, leaving a marker when it starts, finishes, or is cancelled."""
        (MARKS / f"{name}.started").write_text(str(os.getpid()))
        try:
            for _ in range(int(seconds * 10)):
                await asyncio.sleep(0.1)
        except asyncio.CancelledError:
            (MARKS / f"{name}.cancelled").touch()
            raise
        (MARKS / f"{name}.finished").touch()


    class Sleeper(Chainlet):
        async def run(self, tag: str) -> str:
            await work(f"{tag}-sleeper", 120)
            return tag


    class Safe(Chainlet):
        config = ChainletConfig(idempotent=True)

        async def run(self, tag: str) -> str:
            first = not (MARKS / f"{tag}-safe.started").exists()
            await work(f"{tag}-safe", 120 if first else 0.1)  # the first run is killed; a retry is quick
            return f"safe {tag}"


    class Unsafe(Chainlet):
        config = ChainletConfig(autoscaling={"min_replicas": 2, "max_replicas": 2})

        async def run(self, tag: str) -> str:
            first = not (MARKS / f"{tag}-unsafe.started").exists()
            await work(f"{tag}-unsafe", 120 if first else 0.1)  # were it sent again, it would finish at once
            return f"unsafe {tag}"


    @entrypoint
    class Boss(Chainlet):
        def __init__(self, sleeper=depends(Sleeper), safe=depends(Safe, retries=3), unsafe=depends(Unsafe)):
            self.sleeper = sleeper
            self.safe = safe
            self.unsafe = unsafe

        async def run(self, tag: str, what: str) -> list[str]:
            (MARKS / f"{tag}-boss.started").touch()
            try:
                if what == "sleep":
                    return await self.sleeper.map([f"{tag}-a", f"{tag}-b"], concurrency=2)
                return [await (self.safe if what == "safe" else self.unsafe).run(tag)]
            except asyncio.CancelledError:
                (MARKS / f"{tag}-boss.cancelled").touch()
                raise
''')


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Platform, Path]]:
    home = tmp_path_factory.mktemp("home")
    marks = tmp_path_factory.mktemp("marks")
    chain = home / "boss.py"
    chain.write_text(CHAIN.replace("MARKS_DIR", repr(str(marks))))
    p = Platform(home).start()
    try:
        p.cli("chains", "deploy", str(chain), "--name", "boss", "--out", str(home / "pkgs"), "--timeout", "120")
        yield p, marks
    finally:
        p.stop()


def _wait_for(marks: Path, *names: str, timeout: float = 30) -> None:
    async def wait() -> None:
        while not all((marks / n).exists() for n in names):
            await asyncio.sleep(0.05)

    asyncio.run(asyncio.wait_for(wait(), timeout))


@pytest.mark.slow
def test_a_client_that_leaves_cancels_every_step(deployed: tuple[Platform, Path]) -> None:
    p, marks = deployed

    async def call_and_leave() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            task = asyncio.create_task(client.post(f"{p.url}/chains/boss/run", json={"tag": "c1", "what": "sleep"},
                                                   headers={"Authorization": f"Bearer {p.key}"}))
            await asyncio.wait_for(_until(marks, "c1-a-sleeper.started", "c1-b-sleeper.started"), 30)
            task.cancel()  # the client goes away mid-call: its connection closes
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(call_and_leave())
    # The entry and both fanned-out calls of the other step were cancelled; none ran on to the end.
    _wait_for(marks, "c1-boss.cancelled", "c1-a-sleeper.cancelled", "c1-b-sleeper.cancelled")
    assert not list(marks.glob("c1-*.finished"))
    logs = p.api("GET", "/deployments/boss-sleeper/logs", params={"tail": 200})
    assert logs.count("step Sleeper cancelled") >= 2


async def _until(marks: Path, *names: str) -> None:
    while not all((marks / n).exists() for n in names):
        await asyncio.sleep(0.05)


def _kill_when_started(p: Platform, marks: Path, name: str, body: dict) -> httpx.Response:
    """Call the chain, kill -9 the replica running `name` once it has started, and return the answer."""

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(timeout=90) as client:
            task = asyncio.create_task(client.post(f"{p.url}/chains/boss/run", json=body,
                                                   headers={"Authorization": f"Bearer {p.key}"}))
            await asyncio.wait_for(_until(marks, f"{name}.started"), 30)
            os.kill(int((marks / f"{name}.started").read_text()), signal.SIGKILL)
            return await asyncio.wait_for(task, 90)

    return asyncio.run(run())


@pytest.mark.slow
def test_a_killed_replica_of_an_idempotent_step_is_retried(deployed: tuple[Platform, Path]) -> None:
    p, marks = deployed
    r = _kill_when_started(p, marks, "k1-safe", {"tag": "k1", "what": "safe"})
    assert r.status_code == 200, r.text
    assert r.json() == ["safe k1"]
    assert (marks / "k1-safe.finished").exists()  # the retry ran to its end on a new replica


@pytest.mark.slow
def test_a_killed_replica_of_another_step_is_one_error_naming_it(deployed: tuple[Platform, Path]) -> None:
    p, marks = deployed
    # Two replicas: the gateway could send the call to the other one, and must not (it may have run already).
    p.wait("two ready Unsafe replicas", lambda: len([r for r in p.show("boss-unsafe")["replicas"]
                                                       if r["state"] == "ready"]) == 2, timeout=60)
    r = _kill_when_started(p, marks, "k2-unsafe", {"tag": "k2", "what": "unsafe"})
    assert r.status_code == 500, r.text
    err = decode_error(r.status_code, r.json(), "Boss", "")
    assert (err.step, err.kind) == ("Unsafe", "error"), r.text
    assert "StepUnavailable" in err.message
    assert not (marks / "k2-unsafe.finished").exists()
