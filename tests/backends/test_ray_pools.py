"""Two real Ray clusters as two capacity pools of one platform (each pool has its own agent process, since Ray
connects a process to one cluster): a deployment spread over both, re-adopted after a kill -9 of the platform
with no duplicate actors, an agent killed and restarted without losing a replica, a GPU replica pending with
its reason, and the loss of a whole cluster under load through the gateway without a failed request."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from ballast.backends.ray import RayBackend
from tests.backends.ray_heads import RayHead, ballast_actors
from tests.conftest import write_package
from tests.control.platform import Platform
from tests.platform.test_pools import Load

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

MODEL = """
import os

class Model:
    def predict(self, inputs):
        return {"replica": os.environ["BALLAST_REPLICA_ID"], "inputs": inputs}
"""
YAML = """name: {name}
runtime: {{shutdown_grace_s: 2, predict_concurrency: 8}}
health: {{liveness_period_s: 0.5}}
resources: {{cpu: 0.5, memory: 256Mi{extra}}}
autoscaling: {{min_replicas: {n}, max_replicas: {n}}}
placement: {{pools: [ray-a, ray-b], spread: {spread}}}
"""


@pytest.fixture(scope="module")
def heads() -> Iterator[list[RayHead]]:
    """Two single-node clusters, one CPU each (room for two half-CPU replicas), started side by side; the second
    declares one `H100` (a custom resource, as nodes with accelerators Ray does not know declare theirs)."""
    made = [RayHead(num_cpus=1), RayHead(num_cpus=1, resources={"H100": 1})]
    try:
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(RayHead.start, made))
        yield made
    finally:
        for h in made:
            h.close()


@pytest.fixture(scope="module")
def platform(heads: list[RayHead], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    p = Platform(tmp_path_factory.mktemp("home"), retire_grace_s=4)
    p.env["BALLAST_RAY_REPLICA_HOST"] = "127.0.0.1"  # replicas listen on loopback only
    p.start()
    try:
        for name, head in zip(("ray-a", "ray-b"), heads, strict=True):
            assert f"pool {name} added (ray at" in p.cli("pools", "add", name, "--ray", head.address).stdout
        p.wait("both Ray pools healthy", lambda: all(pools(p)[n]["healthy"] for n in ("ray-a", "ray-b")),
               timeout=180)
        yield p
    finally:
        p.stop()


def pools(p: Platform) -> dict[str, dict[str, Any]]:
    return {x["name"]: x for x in p.api("GET", "/pools")["data"]}


def ready(p: Platform, name: str, n: int) -> list[dict[str, Any]] | None:
    reps = [r for r in p.show(name)["replicas"] if r["state"] == "ready"]
    return sorted(reps, key=lambda r: r["pool"]) if len(reps) == n and len(p.show(name)["replicas"]) == n else None


def predict(p: Platform, name: str, body: object) -> dict[str, Any]:
    r = httpx.post(f"{p.url}/deployments/{name}/predict", json=body, timeout=30,
                   headers={"Authorization": f"Bearer {p.key}"})
    assert r.status_code == 200, r.text
    return dict(r.json())


def actors(heads: list[RayHead]) -> list[list[str]]:
    with ThreadPoolExecutor(len(heads)) as ex:
        return list(ex.map(ballast_actors, [h.address for h in heads]))


def pool_downs(p: Platform, pool: str) -> int:
    return sum(e["kind"] == "pool_down" and e["data"].get("pool") == pool
               for e in p.api("GET", "/events?deployment=-")["data"])


def agent_pid(platform_pid: int, pool: str) -> int | None:
    """The platform's agent process for `pool` (its child, named by its command line)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            ppid = int((entry / "stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == platform_pid and "ballast.backends.ray_agent" in argv and pool in argv:
            return int(entry.name)
    return None


@pytest.fixture(scope="module")
def spread(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Two replicas of one deployment, one on each cluster."""
    yaml = YAML.format(name="spread", n=2, extra="", spread="true")
    pkg = write_package(tmp_path_factory.mktemp("spread"), yaml, MODEL)
    platform.cli("deploy", str(pkg), "--wait", "--timeout", "240", timeout=300)
    reps = platform.wait("two ready replicas", lambda: ready(platform, "spread", 2), timeout=120)
    assert [r["pool"] for r in reps] == ["ray-a", "ray-b"]
    return reps


def test_two_clusters_spread_readopted_after_kill9_agent_restarted(heads: list[RayHead], platform: Platform,
                                                                    spread: list[dict[str, Any]]) -> None:
    p = platform
    assert {predict(p, "spread", {"i": i})["replica"] for i in range(20)} == {r["id"] for r in spread}
    before = actors(heads)
    assert [len(a) for a in before] == [1, 1], before  # one actor per replica, each on its own cluster
    for names, rep in zip(before, spread, strict=True):
        assert f"-{rep['id']}-" in names[0]

    # kill -9 of the platform: the agents leave with it, the detached actors keep serving; a new platform
    # re-adopts them through new agents, and starts nothing.
    p.kill()
    assert all(httpx.get(r["url"] + "/health/ready", timeout=10).status_code == 200 for r in spread)
    p.start(timeout=180)

    def adopted() -> list[dict[str, Any]] | None:
        events = p.api("GET", "/deployments/spread/events")["data"]
        return events if sum(e["kind"] == "replica_adopted" for e in events) == 2 else None

    events = p.wait("both replicas re-adopted", adopted, timeout=180)
    assert sum(e["kind"] == "replica_started" for e in events) == 2
    again = p.wait("re-adopted replicas ready", lambda: ready(p, "spread", 2), timeout=60)
    assert [(r["id"], r["pid"], r["url"]) for r in again] == [(r["id"], r["pid"], r["url"]) for r in spread]
    assert {predict(p, "spread", {"i": i})["replica"] for i in range(20)} == {r["id"] for r in spread}
    assert actors(heads) == before  # same actor names, no duplicates

    # The agent of ray-a dies: it is restarted, the pool stays up and its replica is kept.
    assert p.proc is not None
    downs = pool_downs(p, "ray-a")
    old = p.wait("ray-a's agent", lambda: agent_pid(p.proc.pid, "ray-a"), timeout=30)  # type: ignore[union-attr]
    os.kill(old, signal.SIGKILL)
    new = p.wait("a new agent for ray-a", lambda: (lambda x: x if x and x != old else None)(
        agent_pid(p.proc.pid, "ray-a")), timeout=120)  # type: ignore[union-attr]
    assert new != old
    assert {predict(p, "spread", {"i": i})["replica"] for i in range(20)} == {r["id"] for r in spread}
    marker = f"re-adopted Ray actor {before[0][0]}"  # what each new agent writes when it first inspects it
    p.wait("ray-a's replica inspected by its new agent",
           lambda: p.cli("logs", "spread", "--tail", "1000").stdout.count(marker) == 2, timeout=60)
    assert [(r["id"], r["pid"]) for r in ready(p, "spread", 2) or []] == [(r["id"], r["pid"]) for r in spread]
    assert pools(p)["ray-a"]["healthy"]
    assert pool_downs(p, "ray-a") == downs


def test_accelerators_a_pool_lacks_are_sought_in_the_other_pool_or_wait(platform: Platform, tmp_path: Path) -> None:
    p = platform

    def replica(name: str, state: str) -> dict[str, Any] | None:
        reps = p.show(name)["replicas"]
        return reps[0] if reps and reps[0]["state"] == state and (state != "pending" or reps[0]["reason"]) else None

    # Two H100s: no node of either cluster has them; pending, with each pool's reason, never started.
    pkg = write_package(tmp_path / "two", YAML.format(name="two-gpus", n=1, extra=", accelerator: 'H100:2'",
                                                  spread="true"), MODEL)
    p.cli("deploy", str(pkg))
    rep = p.wait("a replica pending", lambda: replica("two-gpus", "pending"), timeout=60)
    assert "ray-a" in rep["reason"] and "ray-b" in rep["reason"] and "2 x H100" in rep["reason"], rep["reason"]
    assert "no node of the Ray cluster" in rep["reason"] and rep["url"] is None

    # One H100: placement puts it in ray-a (pools filled in order), which has none; it starts in ray-b instead.
    pkg = write_package(tmp_path / "one", YAML.format(name="one-gpu", n=1, extra=", accelerator: 'H100:1'",
                                                      spread="false"), MODEL)
    p.cli("deploy", str(pkg), "--wait", "--timeout", "240", timeout=300)
    rep = p.wait("a ready replica", lambda: replica("one-gpu", "ready"), timeout=120)
    assert rep["pool"] == "ray-b"
    assert predict(p, "one-gpu", {"x": 1})["replica"] == rep["id"]
    for name in ("two-gpus", "one-gpu"):  # gone, with their reservations: the next test needs ray-b's room
        p.api("DELETE", f"/deployments/{name}")
    p.wait("both deleted", lambda: not {"two-gpus", "one-gpu"} & {d["name"] for d in p.api("GET", "/deployments")[
        "data"]}, timeout=120)


def ping_error(backend: RayBackend) -> str | None:
    try:
        backend.ping()
    except Exception as e:
        return str(e)
    return None


def test_losing_a_cluster_under_load_fails_over_without_a_failed_request(
        heads: list[RayHead], platform: Platform, spread: list[dict[str, Any]], tmp_path: Path) -> None:
    p = platform
    probe = RayBackend("probe-" + os.urandom(3).hex(), address=heads[0].address, logs_dir=tmp_path, name="probe")
    assert ping_error(probe) is None
    load = Load(p, "spread")
    load.start()
    try:
        p.wait("traffic", lambda: load.sent >= 10, timeout=60)
        heads[0].kill()  # the whole of ray-a: head, workers, the replica process
        p.wait("ray-a down", lambda: not pools(p)["ray-a"]["healthy"], timeout=60)
        moved = p.wait("two replicas ready on ray-b", lambda: (lambda r: r if r and all(
            x["pool"] == "ray-b" for x in r) else None)(ready(p, "spread", 2)), timeout=180)
        sent = load.sent
        p.wait("traffic after the failover", lambda: load.sent >= sent + 20, timeout=60)
    finally:
        load.finish()
    assert load.errors == [], load.errors[:5]
    assert load.sent > 30
    assert spread[1]["id"] in {r["id"] for r in moved}  # ray-b's replica served on; ray-a's was replaced
    why = pools(p)["ray-a"]["reason"] or ""
    assert "its cluster does not answer" in why or "its replicas failed" in why, why
    try:  # the pool's health check on its own: the lost cluster's ping fails (and stays failed)
        err = p.wait("the lost cluster's ping fails", lambda: ping_error(probe), timeout=30)
        assert "did not answer" in err or "no live node" in err, err
    finally:
        probe.close()
    events = [e["kind"] for e in p.api("GET", "/events?deployment=-")["data"]]
    assert "pool_down" in events
    assert len(ballast_actors(heads[1].address)) == 2
