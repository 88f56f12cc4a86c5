"""Capacity pools end to end: a real `ballast up` with two local pools, real replica processes, real failures.

A second pool is another set of local processes (with its own logs directory). It is made to fail for real: its
replica processes are SIGKILLed, and a file put where its logs directory was, so it cannot start new ones either.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import write_package
from tests.control.platform import Platform, kill_leftovers, pid_alive

MODEL = """
import os

class Model:
    def predict(self, inputs):
        return {"replica": os.environ["BALLAST_REPLICA_ID"], "inputs": inputs}
"""


def package(root: Path, name: str, extra: str = "") -> Path:
    yaml = (f"name: {name}\nruntime: {{shutdown_grace_s: 2}}\nhealth: {{liveness_period_s: 0.5}}\n"
            f"autoscaling: {{min_replicas: 2, max_replicas: 4}}\n{extra}")
    return write_package(root, yaml, MODEL)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Any:
    p = Platform(tmp_path_factory.mktemp("home"), retire_grace_s=4)
    p.env["BALLAST_POOL_RETRY_S"] = "1"
    p.start()
    pids: list[int] = []
    try:
        yield p
        pids = p.replica_pids()
    finally:
        p.stop()
        kill_leftovers([pid for pid in pids if pid_alive(pid)])


def ready(p: Platform, name: str, n: int) -> list[dict[str, Any]] | None:
    reps = [r for r in p.show(name)["replicas"] if r["state"] == "ready"]
    return reps if len(reps) == n else None


def pools(p: Platform) -> dict[str, dict[str, Any]]:
    return {x["name"]: x for x in p.api("GET", "/pools")["data"]}


class Load(threading.Thread):
    """Non-streaming requests through the gateway, one at a time, bounded in count and in time.

    The count bound is far above what a test's waits need (a fast machine sends ~200 requests a second, and a
    load that ran out of requests mid-test once looked like a stalled failover); the time bound ends it anyway."""

    def __init__(self, p: Platform, name: str, max_requests: int = 200_000, max_s: float = 600):
        super().__init__(daemon=True)
        self.p, self.name, self.max_requests = p, name, max_requests
        self.deadline = time.monotonic() + max_s
        self.stop_flag = threading.Event()
        self.sent = 0
        self.errors: list[str] = []

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.p.key}"}
        with httpx.Client(timeout=30, headers=headers) as c:
            while (not self.stop_flag.is_set() and self.sent < self.max_requests
                   and time.monotonic() < self.deadline):
                self.sent += 1
                try:
                    r = c.post(f"{self.p.url}/deployments/{self.name}/predict", json={"i": self.sent})
                    if r.status_code != 200:
                        self.errors.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    self.errors.append(f"{type(e).__name__}: {e}")

    def finish(self) -> None:
        self.stop_flag.set()
        self.join(60)


def test_pools_cli_rest_and_placement(platform: Platform, tmp_path: Path) -> None:
    p = platform
    p.wait("the default pool", lambda: "local" in pools(p))
    assert pools(p)["local"]["default"] and pools(p)["local"]["healthy"]
    out = p.cli("pools", "add", "b", "--region", "west", "--label", "tier=spot", "--max-replicas", "3",
                "--cloud", "aws", "--cost-per-hour", "0.5").stdout
    assert "pool b added (local)" in out
    listed = p.cli("pools", "list").stdout
    assert "local (default)" in listed and "west" in listed and "healthy" in listed
    assert "aws" in listed and "0.5" in listed and "COST/H" in listed
    assert pools(p)["b"]["cloud"] == "aws" and pools(p)["b"]["cost_per_hour"] == 0.5
    assert pools(p)["local"]["cost_per_hour"] is None  # unpriced: ranked as free, so still preferred

    # Bad input: OpenAI-style errors, nothing written.
    assert p.api("POST", "/pools", json={"name": "b"}, expect=409)["error"]["code"] == "pool_exists"
    assert p.api("POST", "/pools", json={"name": "Bad_Name"}, expect=400)["error"]["type"]
    assert p.api("POST", "/pools", json={"name": "r", "ray_address": "../etc:1"}, expect=400)["error"]["type"]
    assert p.api("POST", "/pools", json={"name": "r", "max_replicas": -1}, expect=400)["error"]["type"]
    assert p.api("POST", "/pools", json={"name": "r", "cost_per_hour": -1}, expect=400)["error"]["type"]
    assert p.api("POST", "/pools", json={"name": "r", "cloud": "a/b"}, expect=400)["error"]["type"]
    assert p.api("DELETE", "/pools/local", expect=409)["error"]["code"] == "pool_is_default"
    assert p.api("DELETE", "/pools/nope", expect=404)["error"]["code"] == "pool_not_found"
    assert set(pools(p)) == {"local", "b"}

    # Spread: two replicas, one in each pool; `show` names the pool.
    p.cli("deploy", str(package(tmp_path / "s", "spread")), "--wait", "--timeout", "90")
    reps = p.wait("two ready replicas", lambda: ready(p, "spread", 2), timeout=60)
    assert sorted(r["pool"] for r in reps) == ["b", "local"]
    show = p.cli("show", "spread").stdout
    assert " b " in show and " local " in show
    assert p.api("DELETE", "/pools/b", expect=409)["error"]["code"] == "pool_not_empty"
    # The logs of a replica in pool b are read like any other.
    b_rep = next(r for r in reps if r["pool"] == "b")
    assert f"[v1 {b_rep['id']}]" in p.cli("logs", "spread", "--tail", "50").stdout

    # Pinned to pool b by ballast.yaml; pinned to a pool that does not exist: pending with the reason.
    p.cli("deploy", str(package(tmp_path / "p", "pinned", "placement: {pools: [b]}\n")), "--wait", "--timeout", "90")
    reps = p.wait("two ready pinned replicas", lambda: ready(p, "pinned", 2), timeout=60)
    assert {r["pool"] for r in reps} == {"b"}
    p.cli("deploy", str(package(tmp_path / "n", "nowhere", "placement: {pools: [mars]}\n")))

    def pending() -> list[dict[str, Any]] | None:
        reps = p.show("nowhere")["replicas"]
        return reps if len(reps) == 2 and all(r["state"] == "pending" and r["reason"] for r in reps) else None

    reps = p.wait("pending replicas", pending, timeout=30)
    assert "no pool can take it: mars unknown" in reps[0]["reason"]
    # Pool b holds 3 at most: pinned has 2, spread 1 -> full.
    p.api("POST", "/deployments/pinned/scale", json={"env": "production", "min": 3, "max": 3})
    p.wait("a pinned replica waits for room", lambda: any(
        r["state"] == "pending" and "b full (3 replicas)" in (r["reason"] or "") for r in p.show("pinned")["replicas"]))
    for name in ("pinned", "nowhere"):
        p.api("DELETE", f"/deployments/{name}")

    # Drain: b's replicas move to other pools (each once its replacement serves), then b can be removed.
    assert "pool b draining" in p.cli("pools", "drain", "b").stdout
    p.wait("spread leaves b", lambda: (lambda r: r is not None and {x["pool"] for x in r} == {"local"})(
        ready(p, "spread", 2)) and not [x for x in p.show("spread")["replicas"] if x["pool"] == "b"], timeout=60)
    p.wait("b is empty", lambda: pools(p)["b"]["replicas"]["total"] == 0, timeout=30)
    assert "pool b active" in p.cli("pools", "drain", "b", "--undo").stdout
    p.api("DELETE", "/deployments/spread")
    p.wait("b is empty", lambda: pools(p)["b"]["replicas"]["total"] == 0, timeout=30)
    assert "pool b removed" in p.cli("pools", "remove", "b").stdout
    kinds = [e["kind"] for e in p.api("GET", "/events?deployment=-")["data"]]
    assert {"pool_added", "pool_draining", "pool_active", "pool_removed"} <= set(kinds)


def test_deploy_pool_pins_placement_over_ballast_yaml(platform: Platform, tmp_path: Path) -> None:
    p = platform
    p.api("POST", "/pools", json={"name": "d"}, expect=201)
    p.wait("pool d healthy", lambda: pools(p)["d"]["healthy"], timeout=30)
    pkg = package(tmp_path / "pin", "cli-pinned", "placement: {pools: [local]}\n")
    out = p.cli("deploy", str(pkg), "--pool", "d", "--wait", "--timeout", "90").stdout
    assert "version 1 created" in out and "pinned to d" in out
    p.wait("two ready replicas in d", lambda: only_in(p, "cli-pinned", 2, {"d"}), timeout=60)
    assert p.show("cli-pinned")["versions"][0]["pools"] == ["d"]
    assert " d " in p.cli("show", "cli-pinned").stdout
    # The pin is part of the version: the same package without --pool is another version (pinned by its
    # ballast.yaml), and with the same --pool the first version again.
    assert "version 2 created" in p.cli("deploy", str(pkg)).stdout
    assert "version 1 reused" in p.cli("deploy", str(pkg), "--pool", "d").stdout
    assert [v["pools"] for v in p.show("cli-pinned")["versions"]] == [["d"], ["local"]]
    bad = p.cli("deploy", str(pkg), "--pool", "Bad_Name", check=False)
    assert bad.returncode != 0 and "invalid pool name" in bad.stdout + bad.stderr
    assert len(p.show("cli-pinned")["versions"]) == 2  # nothing written
    p.api("DELETE", "/deployments/cli-pinned")
    p.wait("d is empty", lambda: pools(p)["d"]["replicas"]["total"] == 0, timeout=30)
    p.cli("pools", "remove", "d")


def downs(p: Platform, pool: str) -> int:
    return len([e for e in p.api("GET", "/events?deployment=-&limit=1000")["data"]
                if e["kind"] == "pool_down" and e["data"]["pool"] == pool])


def only_in(p: Platform, name: str, n: int, pools_: set[str]) -> list[dict[str, Any]] | None:
    reps = ready(p, name, n)
    return reps if reps and {x["pool"] for x in reps} == pools_ else None


@pytest.mark.parametrize("lost", ["c", "local"])  # another pool; the platform's own one (the gateway prefers it)
def test_pool_failover_under_load_and_recovery(platform: Platform, tmp_path: Path, lost: str) -> None:
    p = platform
    other = "local" if lost == "c" else "c"
    name = f"fail-{lost}"
    if "c" not in pools(p):
        p.api("POST", "/pools", json={"name": "c"}, expect=201)
    p.wait("pool c healthy", lambda: pools(p)["c"]["healthy"], timeout=30)
    # Even spread (`prefer: spread`): the default fills the cheapest pool (tests/control/test_placement.py).
    p.cli("deploy", str(package(tmp_path / "f", name, "placement: {prefer: spread}\n")), "--wait", "--timeout", "90")
    reps = p.wait("one replica in each pool", lambda: (lambda r: r if r and sorted(x["pool"] for x in r) ==
                                                      ["c", "local"] else None)(ready(p, name, 2)), timeout=60)
    victim = next(r for r in reps if r["pool"] == lost)
    downs_before = downs(p, lost)
    load = Load(p, name)
    load.start()
    logs = p.home / "logs" / ("_pools/c" if lost == "c" else "") / name
    try:
        p.wait("traffic", lambda: load.sent >= 20, timeout=30)
        # The pool is lost for real: it cannot start replicas any more, and its processes die.
        logs.rename(logs.with_name(name + ".saved"))
        logs.write_text(f"not a directory: replicas of {name} cannot start in pool {lost}\n")
        os.kill(victim["pid"], signal.SIGKILL)
        p.wait(f"pool {lost} down", lambda: not pools(p)[lost]["healthy"], timeout=30)
        moved = p.wait(f"two ready replicas in {other}", lambda: only_in(p, name, 2, {other}), timeout=60)
        assert victim["id"] not in {r["id"] for r in moved}
        sent_at_failover = load.sent
        p.wait("traffic after the failover", lambda: load.sent >= sent_at_failover + 20, timeout=30)
    finally:
        load.finish()
    assert load.errors == [], load.errors[:5]
    # The loss's own pool_down (a rebalance may try the pool again, and fail, once it is back).
    down = [e for e in p.api("GET", "/events?deployment=-&limit=1000")["data"]
            if e["kind"] == "pool_down" and e["data"]["pool"] == lost][downs_before]
    assert "failed" in down["message"]

    # It comes back (retry after a backoff) while it still cannot start replicas: a replica placed there
    # fails to start, and the pool goes down again; the replica is placed elsewhere.
    p.wait(f"pool {lost} back", lambda: pools(p)[lost]["healthy"], timeout=30)
    p.api("POST", f"/deployments/{name}/scale", json={"env": "production", "min": 3, "max": 3})
    p.wait(f"{lost} down twice", lambda: downs(p, lost) >= downs_before + 2, timeout=60)
    p.wait(f"three ready in {other}", lambda: only_in(p, name, 3, {other}), timeout=60)
    # Repaired: once it is back, replicas rebalance by policy (spread: one of the three moves back), one at a time,
    # the new replica serving before the old one drains: no request fails meanwhile.
    load = Load(p, name)
    load.start()
    try:
        logs.unlink()
        logs.with_name(name + ".saved").rename(logs)
        p.wait(f"pool {lost} healthy", lambda: pools(p)[lost]["healthy"], timeout=60)
        p.wait(f"one replica moved back to {lost}", lambda: (lambda r: r if r and sorted(x["pool"] for x in r) ==
                                                            sorted([other, other, lost]) else None)(
            ready(p, name, 3)), timeout=90)
        sent_at_move = load.sent
        p.wait("traffic after the move", lambda: load.sent >= sent_at_move + 10, timeout=30)
    finally:
        load.finish()
    assert load.errors == [], load.errors[:5]
    events = p.api("GET", f"/events?deployment={name}&limit=1000")["data"]
    moves = [e for e in events if e["kind"] == "replica_moving"]
    assert moves and moves[-1]["data"]["from"] == other and moves[-1]["data"]["to"] == lost
    stops = [e["message"] for e in events if e["kind"] == "replica_stopping"]
    assert any(f"moved to pool {lost} (rebalanced)" in m for m in stops)
    p.api("POST", f"/deployments/{name}/scale", json={"env": "production", "min": 4, "max": 4})
    reps = p.wait(f"two replicas in {lost}", lambda: (lambda r: r if r and [x["pool"] for x in r].count(lost) == 2
                                                      else None)(ready(p, name, 4)), timeout=60)
    assert "pool_up" in [e["kind"] for e in p.api("GET", "/events?deployment=-")["data"]]
    p.api("DELETE", f"/deployments/{name}")
    p.wait("its replicas stop", lambda: not p.show(name)["replicas"] if name in
           [d["name"] for d in p.api("GET", "/deployments")["data"]] else True, timeout=30)
