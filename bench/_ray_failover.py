"""Ray pool failover, measured for bench/scaleout.py: two single-node Ray clusters (1 CPU each, their own ports and
temp dirs) as pools `ray-a` and `ray-b` of one local platform (each pool through its own agent process), a
deployment of examples/echo with two half-CPU replicas spread over both, closed-loop requests through the
gateway. Each round cluster `ray-a` is lost for real: every process of it (head, workers, the replica) is
SIGKILLed. Measured from the loss: `detect_s` (pool marked down), `restored_s` (two ready replicas again, both on
`ray-b`), and the requests that failed meanwhile. Fresh clusters and platform each round (one is lost).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import ROOT, free_port, running
from _pool_failover import POOL_ENV, Load, _pool, _wait

PORTS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
         "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
PLACED = "\nresources: {cpu: 0.5, memory: 256Mi}\nautoscaling: {min_replicas: 2, max_replicas: 2}\n" \
         "health: {liveness_period_s: 0.5}\nplacement: {pools: [ray-a, ray-b]}\n"


class Head:
    """One Ray head on loopback; stopped by killing exactly the processes that carry its token."""

    def __init__(self) -> None:
        self.token, self.port = os.urandom(6).hex(), free_port()
        self.temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        self.address = f"127.0.0.1:{self.port}"

    def start(self) -> Head:
        env = {**os.environ, "BALLAST_BENCH_RAY": self.token, "RAY_USAGE_STATS_ENABLED": "0"}
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={self.port}", "--num-cpus=1",
               "--include-dashboard=false", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp}",
               f"--memory={4 * 2**30}", f"--object-store-memory={100 * 2**20}", "--disable-usage-stats",
               *[f"{opt}={free_port()}" for opt in PORTS]]
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)
        return self

    def kill(self) -> None:
        needle = f"BALLAST_BENCH_RAY={self.token}".encode()
        for _ in range(3):
            pids = []
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit() and int(entry.name) != os.getpid():
                    with contextlib.suppress(OSError):
                        if needle in (entry / "environ").read_bytes().split(b"\0"):
                            pids.append(int(entry.name))
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if not pids:
                return
            time.sleep(0.5)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.temp, ignore_errors=True)


def one_round(platform_cls: Any, work: Path, rnd: int) -> dict[str, float]:
    from ballast.cli.packing import pack

    heads = [Head(), Head()]
    try:
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(Head.start, heads))
        with running([]) as procs:
            env = {**POOL_ENV, "BALLAST_RAY_REPLICA_HOST": "127.0.0.1"}
            plat = platform_cls("local", procs, work / f"home-{rnd}", extra_env=env)
            for name, head in zip(("ray-a", "ray-b"), heads, strict=True):
                plat.http.post("/api/v1/pools", json={"name": name, "ray_address": head.address}).raise_for_status()
            _wait("both Ray pools healthy", lambda: all(_pool(plat, n)["healthy"] for n in ("ray-a", "ray-b")), 180)
            return _measure(plat, heads[0], pack(_package(work), work), rnd)
    finally:
        for h in heads:
            h.close()


def _package(work: Path) -> Path:
    pkg = work / "echo-ray"
    if not pkg.exists():
        shutil.copytree(ROOT / "examples" / "echo", pkg)
        (pkg / "ballast.yaml").write_text((pkg / "ballast.yaml").read_text() + PLACED)
    return pkg


def _measure(plat: Any, lost: Head, packed: Any, rnd: int) -> dict[str, float]:
    name = f"rayfo-{rnd}"
    plat.deploy(name, packed.path.read_bytes(), packed.sha256)

    def ready() -> list[dict[str, Any]]:
        return [r for r in plat.http.get(f"/api/v1/deployments/{name}").json()["replicas"] if r["state"] == "ready"]

    _wait("one ready replica per cluster", lambda: sorted(x["pool"] for x in ready()) == ["ray-a", "ray-b"], 240)
    load = Load(plat.url, plat.key, name)
    load.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    lost.kill()
    try:
        _wait("pool ray-a down", lambda: not _pool(plat, "ray-a")["healthy"])
        detect = time.monotonic() - t0
        _wait("capacity restored", lambda: (lambda r: len(r) == 2 and {x["pool"] for x in r} == {"ray-b"})(ready()),
              180)
        restored = time.monotonic() - t0
        time.sleep(1.0)
    finally:
        load.stop_flag.set()
        load.join(60)
    during = [ok for t, ok in load.results if t >= t0]
    return {"detect_s": detect, "restored_s": restored, "failed": float(during.count(False)),
            "requests": float(len(during))}


def measure(platform_cls: Any, rounds: int) -> dict[str, list[float]]:
    """Rounds of a Ray cluster's loss; per metric, one value per round."""
    work = Path(tempfile.mkdtemp(prefix="bench-rayfo-"))
    out: dict[str, list[float]] = {"detect_s": [], "restored_s": [], "failed": [], "requests": []}
    try:
        for rnd in range(rounds):
            got = one_round(platform_cls, work, rnd)
            for k, v in got.items():
                out[k].append(v)
            print(f"ray failover round {rnd + 1}/{rounds}: pool down after {got['detect_s']:.2f} s, capacity "
                  f"restored after {got['restored_s']:.2f} s, {got['failed']:.0f} of {got['requests']:.0f} "
                  "requests failed", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
