"""The platform end to end: real `ballast up` and replica processes on loopback, a real store."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import write_package
from tests.control.platform import Platform, kill_leftovers, pid_alive

VERSIONED = """
import os

class Model:
    def predict(self, inputs):
        return {{"version": os.environ["BALLAST_VERSION"], "variant": {variant}, "inputs": inputs}}
"""


def versioned(root: Path, variant: int, name: str = "svc") -> Path:
    return write_package(root, f"name: {name}\nruntime: {{shutdown_grace_s: 5}}\nhealth: {{liveness_period_s: 0.5}}\n",
                         VERSIONED.format(variant=variant))


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    p = Platform(home, retire_grace_s=4).start()
    pids: list[int] = []
    try:
        yield p
        pids = p.replica_pids()
    finally:
        code = p.stop()
        leftovers = [pid for pid in pids if pid_alive(pid)]
        kill_leftovers(leftovers)
    assert code == 0, p.output()[-3000:]
    assert not leftovers, f"replica processes left after SIGTERM: {leftovers}"


class TrafficLoop(threading.Thread):
    """A bounded loop of requests straight to the environment's ready replicas (what the gateway will do:
    refresh the endpoints often, retry another replica when one refuses or is draining)."""

    def __init__(self, platform: Platform, name: str, env: str = "production", max_requests: int = 20000):
        super().__init__(daemon=True)
        self.p, self.name, self.env, self.max_requests = platform, name, env, max_requests
        self.stop_flag = threading.Event()
        self.sent = self.failed = self.retries = 0
        self.seen: dict[str, int] = {}
        self.errors: list[str] = []
        self._targets: list[dict] = []
        self._fetched = 0.0

    def targets(self, force: bool = False) -> list[dict]:
        if force or time.monotonic() - self._fetched > 0.1:
            ep = self.p.api("GET", f"/deployments/{self.name}/environments/{self.env}/endpoints")
            self._targets = [t for t in ep["targets"] if t["replicas"]]
            self._fetched = time.monotonic()
        return self._targets

    def run(self) -> None:
        rng = random.Random(0)
        with httpx.Client(timeout=10) as client:
            while not self.stop_flag.is_set() and self.sent < self.max_requests:
                self.sent += 1
                error = "no ready replica"
                for attempt in range(8):
                    targets = self.targets(force=attempt > 0)
                    if not targets:
                        time.sleep(0.05)
                        continue
                    t = rng.choices(targets, weights=[t["weight"] for t in targets])[0]
                    url = rng.choice(t["replicas"])["url"]
                    try:
                        r = client.post(url + "/predict", json={"i": self.sent})
                    except httpx.TransportError as e:
                        error = f"{type(e).__name__} from {url}"
                        self.retries += 1
                        continue
                    if r.status_code == 503:
                        error = f"503 from {url}: {r.text[:200]}"
                        self.retries += 1
                        continue
                    if r.status_code == 200:
                        v = r.json()["version"]
                        self.seen[v] = self.seen.get(v, 0) + 1
                        error = ""
                    else:
                        error = f"{r.status_code} from {url}: {r.text[:200]}"
                    break
                if error:
                    self.failed += 1
                    self.errors.append(error)

    def finish(self) -> None:
        self.stop_flag.set()
        self.join(30)


def test_deploy_promote_canary_rollback_under_traffic(platform, tmp_path):
    p = platform
    out = p.cli("deploy", str(versioned(tmp_path / "v1", 1)), "--name", "svc", "--wait", "--timeout", "60").stdout
    assert "version 1 created" in out and "serves production" in out
    p.wait_serving("svc", 1)
    loop = TrafficLoop(p, "svc")
    loop.start()
    try:
        p.wait("traffic on v1", lambda: loop.seen.get("1", 0) >= 20)
        r = p.api("POST", "/deployments", json={"path": str(versioned(tmp_path / "v2", 2)), "name": "svc"},
                  expect=201)
        assert r["version"] == 2 and "promotion" not in r
        out = p.cli("promote", "svc", "--version", "2", "--env", "production").stdout
        assert "now version 2" in out or "promoted" in out
        p.wait("traffic on v2", lambda: loop.seen.get("2", 0) >= 20)

        # Rollback within the grace period is instant: version 1 is still running.
        out = p.cli("rollback", "svc", "--env", "production").stdout
        assert "promoted (version 1)" in out, out
        seen1 = loop.seen.get("1", 0)
        p.wait("traffic back on v1", lambda: loop.seen.get("1", 0) >= seen1 + 20)

        # Canary: 50% then the rest after a short stepwise ramp.
        r = p.api("POST", "/deployments/svc/promote", json={"version": 2, "env": "production", "canary": 50,
                                                           "ramp_s": 1.0})
        assert r["state"] == "canary"

        def done() -> bool:
            env = next(e for e in p.show("svc")["environments"] if e["name"] == "production")
            return env["canary"] is None and env["version"] == 2

        p.wait("canary completed", done, timeout=30)
        # Version 1 drains and stops after its grace period, while the requests keep flowing.
        p.wait("v1 scaled to zero", lambda: not [r for r in p.show("svc")["replicas"] if r["version"] == 1],
               timeout=60)
        seen2 = loop.seen.get("2", 0)
        p.wait("more traffic on v2", lambda: loop.seen.get("2", 0) >= seen2 + 20)
    finally:
        loop.finish()
    assert loop.failed == 0, loop.errors[:5]
    assert loop.sent >= 100 and loop.seen.get("1") and loop.seen.get("2")
    kinds = [e["kind"] for e in p.api("GET", "/deployments/svc/events?limit=500")["data"]]
    for k in ("deploy", "promote_requested", "promoted", "rollback", "canary", "canary_completed", "retiring",
              "retired", "replica_stopped"):
        assert k in kinds, (k, kinds)
    print(f"traffic: {loop.sent} requests, {loop.failed} failed, {loop.retries} retried, by version {loop.seen}")


def test_killed_replica_is_replaced_and_shows_the_restart(platform, tmp_path):
    p = platform
    p.cli("deploy", str(versioned(tmp_path / "k", 7, name="kill")), "--wait", "--timeout", "60")
    (rep,) = p.show("kill")["replicas"]
    assert rep["state"] == "ready" and rep["restarts"] == 0 and rep["pool"] == "local"
    os.kill(rep["pid"], signal.SIGKILL)

    def replaced() -> dict | None:
        (r,) = p.show("kill")["replicas"]
        return r if r["state"] == "ready" and r["restarts"] == 1 and r["pid"] != rep["pid"] else None

    r = p.wait("replacement", replaced, timeout=60)
    assert r["id"] == rep["id"] and "exited" in r["last_error"]
    assert httpx.post(r["url"] + "/predict", json=1).json()["inputs"] == 1
    assert "replica_failed" in [e["kind"] for e in p.api("GET", "/events?deployment=kill")["data"]]

    # CLI views of the same state.
    show = p.cli("show", "kill").stdout
    assert rep["id"] in show and "ready" in show and "local" in show
    assert "kill" in p.cli("deployments").stdout
    assert "replica_failed" in p.cli("events", "kill").stdout
    logs = p.cli("logs", "kill", "--tail", "50").stdout
    assert f"[v1 {rep['id']}]" in logs and "ready" in logs
    assert "min=1 max=2" in p.cli("scale", "kill", "--env", "production", "--min", "1", "--max", "2").stdout
    p.cli("delete", "kill", "--yes")
    p.wait("replicas of a deleted deployment stop", lambda: not pid_alive(r["pid"]), timeout=30)
    assert p.api("GET", "/deployments/kill", expect=404)["error"]["code"] == "deployment_not_found"


def test_crash_on_load_reaches_crashloop_with_its_error(platform, tmp_path):
    p = platform
    pkg = write_package(tmp_path / "crash", "name: crash\n", """
        class Model:
            def load(self):
                raise RuntimeError("boom-on-load")

            def predict(self, x):
                return x
        """)
    res = p.cli("deploy", str(pkg), "--wait", "--timeout", "60", check=False)
    assert res.returncode == 1 and "crash-looping" in res.stderr and "boom-on-load" in res.stderr, res.stderr
    (r,) = p.show("crash")["replicas"]
    assert r["state"] in ("crashloop", "starting") and r["failures"] >= 2 and r["restarts"] >= 2
    assert "boom-on-load" in r["last_error"] and "last log lines" in r["last_error"]
    env = next(e for e in p.show("crash")["environments"] if e["name"] == "production")
    assert env["version"] is None and env["pending"]["version"] == 1  # never promoted: it never was ready
    p.api("DELETE", "/deployments/crash")


def test_bad_package_auth_errors_and_openapi(platform, tmp_path):
    p = platform
    bad = write_package(tmp_path / "bad", "name: Bad Name\n", "class Model: pass\n")
    before = p.api("GET", "/deployments")["data"]
    r = httpx.post(p.url + "/api/v1/deployments", json={"path": str(bad)},
                   headers={"Authorization": f"Bearer {p.key}"})
    assert r.status_code == 400 and r.headers["x-request-id"]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_package"
    assert "ballast.yaml" in err["message"] and "name" in err["message"] and "Traceback" not in r.text
    assert p.api("GET", "/deployments")["data"] == before
    res = p.cli("deploy", str(bad), check=False)
    assert res.returncode == 1 and "ballast.yaml" in res.stderr

    r = httpx.get(p.url + "/api/v1/deployments")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error" and r.headers["x-request-id"]
    r = httpx.get(p.url + "/api/v1/deployments", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    r = httpx.get(p.url + "/api/v1/nothing", headers={"Authorization": f"Bearer {p.key}", "x-request-id": "abc"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "abc"
    r = httpx.post(p.url + "/api/v1/deployments/x/promote", json={"version": "one"},
                   headers={"Authorization": f"Bearer {p.key}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "version"
    doc = httpx.get(p.url + "/api/v1/openapi.json").json()
    assert "/api/v1/deployments/{name}/promote" in doc["paths"]
    cred = p.home / "credentials.json"
    assert cred.stat().st_mode & 0o777 == 0o600


def test_concurrent_deploys_over_the_api(platform, tmp_path):
    p = platform
    pkgs = [versioned(tmp_path / f"c{i}", 100 + i, name="conc") for i in range(2)]
    results: list[int] = []
    barrier = threading.Barrier(2)

    def go(path: Path) -> None:
        barrier.wait()
        results.append(p.api("POST", "/deployments", json={"path": str(path), "env": "staging"},
                             expect=201)["version"])

    threads = [threading.Thread(target=go, args=(x,)) for x in pkgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [1, 2]
    p.api("DELETE", "/deployments/conc")


def test_dev_replica_reloads_on_change(platform, tmp_path):
    p = platform
    src = versioned(tmp_path / "dev", 1, name="devsvc")
    r = p.api("POST", "/dev", json={"path": str(src)}, expect=201)
    ep = p.wait_serving("devsvc", r["version"], env="development")
    url = ep["targets"][0]["replicas"][0]["url"]
    assert httpx.post(url + "/predict", json=0).json()["variant"] == 1
    (src / "model.py").write_text(VERSIONED.format(variant=2))

    def reloaded() -> bool:
        ep = p.api("GET", "/deployments/devsvc/environments/development/endpoints")
        for t in ep["targets"]:
            for rep in t["replicas"]:
                try:
                    if httpx.post(rep["url"] + "/predict", json=0).json()["variant"] == 2:
                        return True
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
        return False

    p.wait("dev reload", reloaded, timeout=60, every=0.3)
    assert "dev_reload" in [e["kind"] for e in p.api("GET", "/events?deployment=devsvc")["data"]]
    pids = [r["pid"] for r in p.show("devsvc")["replicas"] if r["pid"]]
    assert p.api("DELETE", "/dev/devsvc")["deleted"] is True  # it had only the dev version: nothing is left
    assert "devsvc" not in [d["name"] for d in p.api("GET", "/deployments")["data"]]
    p.wait("dev replicas stop", lambda: not any(pid_alive(pid) for pid in pids), timeout=30)


def test_hung_replica_fails_liveness_and_is_replaced(platform, tmp_path):
    p = platform
    p.cli("deploy", str(versioned(tmp_path / "h", 9, name="hung")), "--wait", "--timeout", "60")
    (rep,) = p.show("hung")["replicas"]
    os.kill(rep["pid"], signal.SIGSTOP)  # alive but answering nothing
    try:
        def replaced() -> dict | None:
            (r,) = p.show("hung")["replicas"]
            return r if r["state"] == "ready" and r["restarts"] == 1 and r["pid"] != rep["pid"] else None

        r = p.wait("replacement of the hung replica", replaced, timeout=90)
        assert "liveness" in r["last_error"]
        p.wait("the hung process is killed", lambda: not pid_alive(rep["pid"]), timeout=30)
    finally:
        kill_leftovers([rep["pid"]])
    p.api("DELETE", "/deployments/hung")


def test_routing_follows_promote_at_once(platform, tmp_path):
    """The moment a promotion is visible to the caller, the gateway routes by it: right after a pending
    promotion lands (seen through the API) and right after each instant promote returns."""
    p = platform
    p.cli("deploy", str(versioned(tmp_path / "a", 1, name="flip")), "--wait", "--timeout", "60")
    p.api("POST", "/deployments", json={"path": str(versioned(tmp_path / "b", 2, name="flip")), "name": "flip"},
          expect=201)
    headers = {"Authorization": f"Bearer {p.key}"}

    def served() -> str:
        r = httpx.post(p.url + "/deployments/flip/predict", json=0, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers["x-ballast-replica"]
        return r.json()["version"]

    assert p.api("POST", "/deployments/flip/promote", json={"version": 2})["state"] == "pending"
    p.wait("promotion landed", lambda: next(e for e in p.show("flip")["environments"]
                                            if e["name"] == "production")["version"] == 2, every=0.01)
    assert served() == "2"
    for i in range(20):
        target = 1 if i % 2 == 0 else 2
        r = p.api("POST", "/deployments/flip/promote", json={"version": target})
        assert r["state"] == "promoted", r
        assert served() == str(target), f"promote {i} to v{target} not in effect when the call returned"
    pids = [r["pid"] for r in p.show("flip")["replicas"] if r["pid"]]
    assert len(pids) == 2
    p.cli("delete", "flip", "--yes")
    assert "flip" not in [d["name"] for d in p.api("GET", "/deployments")["data"]]
    p.wait("replicas of a deleted deployment stop", lambda: not any(pid_alive(pid) for pid in pids), timeout=30)


def test_replica_needing_missing_resources_stays_pending_with_the_reason(platform, tmp_path):
    p = platform
    pkg = write_package(tmp_path / "gpu", 'name: needgpu\nresources: {accelerator: "H100:1"}\n',
                        "class Model:\n    def predict(self, x):\n        return x\n")
    p.api("POST", "/deployments", json={"path": str(pkg)}, expect=201)

    def pending() -> dict | None:
        reps = p.show("needgpu")["replicas"]
        return reps[0] if reps and reps[0]["state"] == "pending" else None

    rep = p.wait("replica pending", pending)
    assert rep["pid"] is None and rep["url"] is None
    assert "no pool has 1 x H100 free" in rep["reason"]
    assert "no pool has 1 x H100 free" in p.cli("show", "needgpu").stdout
    events = p.api("GET", "/deployments/needgpu/events")["data"]
    assert [e for e in events if e["kind"] == "replica_pending"]
    assert not [e for e in events if e["kind"] == "replica_started"]
    p.api("DELETE", "/deployments/needgpu")
    p.wait("deleted and gone", lambda: "needgpu" not in [d["name"] for d in p.api("GET", "/deployments")["data"]])
