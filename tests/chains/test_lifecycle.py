"""A deployed chain over time: its internal key rotated under load (no call fails, the old key is refused after
the grace), and a step's deployment deleted (refused while a chain version uses it; forced, the chain version is
marked broken and a run of it says which step is missing)."""

from __future__ import annotations

import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.control.platform import Platform

CHAIN = textwrap.dedent('''
    import os

    from ballast.chains import Chainlet, depends, entrypoint


    class Leaf(Chainlet):
        async def run(self, x: int) -> int:
            return x + 1


    @entrypoint
    class Top(Chainlet):
        def __init__(self, leaf=depends(Leaf)):
            self.leaf = leaf

        async def run(self, x: int) -> dict[str, int]:
            return {"y": await self.leaf.run(x), "pid": os.getpid()}
''')


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    home = tmp_path_factory.mktemp("home")
    (home / "chain.py").write_text(CHAIN)
    p = Platform(home)
    p.env["BALLAST_CHAIN_KEY_REFRESH_S"] = "0.5"  # step replicas ask for the current key this often
    p.env["BALLAST_CHAIN_DIRECT"] = "0"  # every call between steps through the gateway, with the internal key
    p.start()
    try:
        for name in ("rk", "dl"):
            p.cli("chains", "deploy", str(home / "chain.py"), "--name", name, "--out", str(home / name), "--timeout",
                  "120")
        yield p
    finally:
        p.stop()


def _run(p: Platform, chain: str, x: int) -> httpx.Response:
    return httpx.post(f"{p.url}/chains/{chain}/run", json={"x": x}, headers={"Authorization": f"Bearer {p.key}"},
                      timeout=30)


def _replica_key(pid: int) -> str:
    env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
    return env["BALLAST_CHAIN_KEY"]


class _Load:
    """Calls the chain one after another in a thread (bounded: 150 s, 100,000 calls: far more than the test's
    waits need on a fast machine), keeping every status."""

    def __init__(self, p: Platform, chain: str) -> None:
        self.p, self.chain = p, chain
        self.statuses: list[tuple[float, int, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        end = time.monotonic() + 150
        with httpx.Client(headers={"Authorization": f"Bearer {self.p.key}"}, timeout=30) as client:
            for i in range(100_000):
                if self.stop.is_set() or time.monotonic() > end:
                    return
                r = client.post(f"{self.p.url}/chains/{self.chain}/run", json={"x": i})
                self.statuses.append((time.monotonic(), r.status_code, r.text[:300]))

    def __enter__(self) -> _Load:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(60)


@pytest.mark.slow
def test_rotating_the_internal_key_drops_no_call_and_retires_the_old_key(platform: Platform) -> None:
    p = platform
    first = _run(p, "rk", 1)
    assert first.status_code == 200 and first.json()["y"] == 2, first.text
    old_key = _replica_key(first.json()["pid"])
    step_url = f"{p.url}/chains/rk/steps/rk-leaf/versions/1/run"
    assert httpx.post(step_url, json={"x": 1}, headers={"Authorization": f"Bearer {old_key}"},
                      timeout=30).status_code == 200

    with _Load(p, "rk") as load:
        p.wait("calls under load", lambda: len(load.statuses) >= 5, timeout=30)
        before = time.monotonic()
        out = p.cli("chains", "rotate-key", "rk", "--grace", "5").stdout
        assert "internal key rotated (generation 1" in out and old_key not in out
        assert httpx.post(step_url, json={"x": 1}, headers={"Authorization": f"Bearer {old_key}"},
                          timeout=30).status_code == 200  # in its grace, the old key still works
        p.wait("the entry's replica to pick up the new key", lambda: "rotated internal key" in
               p.api("GET", "/deployments/rk-top/logs", params={"tail": 200}), timeout=30)
        # Past the grace, the old key is refused by the gateway...
        p.wait("the old key to be refused", lambda: httpx.post(
            step_url, json={"x": 1}, headers={"Authorization": f"Bearer {old_key}"}, timeout=30).status_code == 401,
            timeout=30)
        assert time.monotonic() - before >= 5
        after = len(load.statuses)
        p.wait("calls after the grace", lambda: len(load.statuses) >= after + 5, timeout=30)
    # ... and every call, before, during and after the rotation, succeeded.
    assert load.statuses and all(s == 200 for _, s, _ in load.statuses), [x for x in load.statuses if x[1] != 200]
    refused = httpx.get(f"{p.url}/chains/rk/internal-key", headers={"Authorization": f"Bearer {p.key}"}, timeout=30)
    assert refused.status_code == 403  # only the chain's own key may ask for it, not even an admin key
    events = p.api("GET", "/events", params={"deployment": "rk-top"})["data"]
    assert any(e["kind"] == "chain_key_rotated" for e in events), events


@pytest.mark.slow
def test_deleting_a_chains_step_is_refused_unless_forced_then_the_chain_version_is_broken(platform: Platform) -> None:
    p = platform
    assert _run(p, "dl", 1).status_code == 200
    refused = p.api("DELETE", "/deployments/dl-leaf", expect=409)
    assert refused["error"]["code"] == "deployment_in_chain" and "chain dl (version 1)" in refused["error"]["message"]
    assert _run(p, "dl", 2).status_code == 200  # nothing was deleted
    cli = p.cli("delete", "dl-leaf", "--yes", check=False)
    assert cli.returncode != 0 and "chain dl" in cli.stdout + cli.stderr

    out = p.cli("delete", "dl-leaf", "--yes", "--force").stdout
    assert "chain dl version 1 is broken (missing: Leaf)" in out, out
    r = _run(p, "dl", 3)
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("chain_broken", "Leaf") and "version 1 is broken" in err["message"]
    assert r.headers["x-request-id"]
    version = p.api("GET", "/chains/dl")["versions"][0]
    assert (version["broken"], version["missing_steps"]) == (True, ["Leaf"])
    assert p.api("POST", "/chains/dl/promote", json={"version": 1, "env": "staging"}, expect=409)["error"][
        "code"] == "chain_broken"
