"""Pool failover, measured for bench/scaleout.py: one platform with two local pools (`local` and `b`), a
deployment of examples/echo with two replicas (spread: one per pool), closed-loop requests through the gateway.
Each round pool `b` is lost for real: its replica is SIGKILLed and a file put where its logs directory was, so
it cannot start replicas either. Measured from the loss: `detect_s` (pool marked down), `restored_s` (two
ready replicas again, both outside `b`), and the requests that failed meanwhile.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from _common import ROOT, Proc

POOL_ENV = {"BALLAST_POOL_RETRY_S": "1"}


class Load(threading.Thread):
    """Requests one after another (bounded in count), each with its outcome and time."""

    def __init__(self, url: str, key: str, name: str, max_requests: int = 200_000):
        super().__init__(daemon=True)
        self.url, self.key, self.name, self.max_requests = url, key, name, max_requests
        self.stop_flag = threading.Event()
        self.results: list[tuple[float, bool]] = []

    def run(self) -> None:
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {self.key}"}) as c:
            for i in range(self.max_requests):
                if self.stop_flag.is_set():
                    return
                try:
                    ok = c.post(f"{self.url}/deployments/{self.name}/predict", json={"i": i}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.results.append((time.monotonic(), ok))


def _package(work: Path) -> Path:
    pkg = work / "echo2"
    if not pkg.exists():
        shutil.copytree(ROOT / "examples" / "echo", pkg)
        yaml = pkg / "ballast.yaml"
        yaml.write_text(yaml.read_text() + "\nautoscaling: {min_replicas: 2, max_replicas: 2}\n"
                        "health: {liveness_period_s: 0.5}\n")
    return pkg


def _wait(what: str, cond: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def one_round(plat: Any, home: Path, work: Path, rnd: int) -> dict[str, float]:
    from ballast.cli.packing import pack

    name = f"fo-{rnd}"
    packed = pack(_package(work), work)
    plat.deploy(name, packed.path.read_bytes(), packed.sha256)

    def ready() -> list[dict[str, Any]]:
        return [r for r in plat.http.get(f"/api/v1/deployments/{name}").json()["replicas"] if r["state"] == "ready"]

    reps = _wait("one ready replica per pool", lambda: (lambda r: r if sorted(x["pool"] for x in r) ==
                                                        ["b", "local"] else None)(ready()))
    lost = next(r for r in reps if r["pool"] == "b")
    load = Load(plat.url, plat.key, name)
    load.start()
    time.sleep(1.0)
    logs = home / "logs" / "_pools" / "b" / name
    saved = logs.with_name(name + ".saved")
    t0 = time.monotonic()
    logs.rename(saved)
    logs.write_text("pool b cannot start replicas\n")
    os.kill(lost["pid"], signal.SIGKILL)
    try:
        _wait("pool b down", lambda: not _pool(plat, "b")["healthy"])
        detect = time.monotonic() - t0
        _wait("capacity restored", lambda: (lambda r: len(r) == 2 and {x["pool"] for x in r} == {"local"})(ready()))
        restored = time.monotonic() - t0
        time.sleep(1.0)
    finally:
        load.stop_flag.set()
        load.join(60)
        logs.unlink()
        saved.rename(logs)
    during = [ok for t, ok in load.results if t >= t0]
    plat.delete(name)
    _wait("pool b back", lambda: _pool(plat, "b")["healthy"])
    return {"detect_s": detect, "restored_s": restored, "failed": float(during.count(False)),
            "requests": float(len(during))}


def _pool(plat: Any, name: str) -> dict[str, Any]:
    return next(p for p in plat.http.get("/api/v1/pools").json()["data"] if p["name"] == name)


def measure(platform_cls: Any, procs: list[Proc], rounds: int) -> dict[str, list[float]]:
    """Rounds of pool loss on a fresh two-pool platform; per metric, one value per round."""
    work = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    out: dict[str, list[float]] = {"detect_s": [], "restored_s": [], "failed": [], "requests": []}
    try:
        plat = platform_cls("local", procs, work / "home", extra_env=POOL_ENV)
        plat.http.post("/api/v1/pools", json={"name": "b"}).raise_for_status()
        for rnd in range(rounds):
            got = one_round(plat, work / "home", work, rnd)
            for k, v in got.items():
                out[k].append(v)
            print(f"failover round {rnd + 1}/{rounds}: pool down after {got['detect_s']:.2f} s, capacity "
                  f"restored after {got['restored_s']:.2f} s, {got['failed']:.0f} of {got['requests']:.0f} "
                  "requests failed", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
