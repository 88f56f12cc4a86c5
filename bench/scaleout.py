"""Scale-out costs: the Ray backend vs the local one, on one machine.

One command: `python bench/scaleout.py [--quick]`. It starts a single-node Ray cluster (its own temp dir,
2 CPUs, stopped by killing exactly its own processes) and two platforms (`ballast up --backend local` and
`ballast up --backend ray`), then measures, interleaved by round:

  cold_start   deploy (upload of examples/echo as a new deployment) -> first 200 through the gateway. The
               gateway holds that first request while the replica starts, so this is what a client waits.
               Ray adds: the actor's worker process, the package through the object store, the unpack.
  added_p50/99 latency the gateway adds per request (c=1, keep-alive, POST /deployments/echo/predict)
               over calling the replica directly in the same round: the cost of the data path to a
               Ray-placed replica vs a local one (on one node both are loopback HTTP).
  pool failover a third platform with two local pools; one is lost for real under load (bench/_pool_failover.py):
               time to the pool marked down, time to capacity restored in the other pool, failed requests.
               The same with two Ray clusters as the two pools, one of them killed whole (bench/_ray_failover.py).
               `--failover-only` runs just this part (local pools only; add `--ray-pools` for the Ray ones).

Results: bench/results/scaleout.json and a table; ratios (ray / local) are per round, median (min-max).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _pool_failover as failover
import _ray_failover as ray_failover
from _common import (
    ROOT,
    Proc,
    free_port,
    print_ratios,
    print_table,
    ratio_stats,
    running,
    stop_on_sigterm,
    summarize,
    write_results,
)

FAST = {"BALLAST_RECONCILE_INTERVAL_S": "0.1", "BALLAST_DRAIN_S": "0.2"}


def _marked(token: str) -> list[int]:
    needle = f"BALLAST_BENCH_RAY={token}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    out.append(int(entry.name))
    return out


@contextlib.contextmanager
def ray_cluster() -> Iterator[str]:
    token, temp, port = os.urandom(6).hex(), tempfile.mkdtemp(prefix="ray-", dir="/tmp"), free_port()
    # TMPDIR: the replica actors' directories (package copy, replica.log) go inside `temp`, removed below.
    env = {**os.environ, "BALLAST_BENCH_RAY": token, "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": temp}
    ray = str(Path(sys.executable).parent / "ray")
    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                        "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", f"--memory={8 * 2**30}",
                        f"--object-store-memory={200 * 2**20}", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=180)
        yield f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _marked(token):
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            time.sleep(1)
        shutil.rmtree(temp, ignore_errors=True)


class Platform:
    def __init__(self, backend: str, procs: list[Proc], home: Path, ray_address: str | None = None,
                 extra_env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "ballast.cli.main", "up", "--port", str(self.port), "--no-isolation",
               "--backend", backend, "--retire-grace-s", "0"]
        if ray_address:
            cmd += ["--ray-address", ray_address]
        home.mkdir(parents=True)
        self.proc = Proc(cmd, env={**FAST, **(extra_env or {}), "BALLAST_HOME": str(home)}, log=home / "platform.log")
        procs.append(self.proc)
        self.proc.wait_http(self.url + "/api/v1/health")
        self.key = json.loads((home / "credentials.json").read_text())["api_key"]
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=300)

    def deploy(self, name: str, archive: bytes, digest: str) -> None:
        r = self.http.post("/api/v1/packages", content=archive, params={"name": name},
                           headers={"x-ballast-sha256": digest, "content-type": "application/gzip"})
        r.raise_for_status()

    def cold_start(self, name: str, archive: bytes, digest: str) -> float:
        t0 = time.perf_counter()
        self.deploy(name, archive, digest)
        for _ in range(600):  # the gateway holds the request while the replica starts; retry 503s only
            r = self.http.post(f"/deployments/{name}/predict", json={"cold": True})
            if r.status_code == 200:
                return time.perf_counter() - t0
            if r.status_code != 503:
                raise RuntimeError(f"{r.status_code}: {r.text}")
            time.sleep(0.05)
        raise RuntimeError(f"{name} never answered")

    def delete(self, name: str) -> None:
        self.http.delete(f"/api/v1/deployments/{name}").raise_for_status()
        for _ in range(600):
            if name not in [d["name"] for d in self.http.get("/api/v1/deployments").json()["data"]]:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} was not deleted")

    def replica_url(self, name: str) -> str:
        for _ in range(600):
            reps = [r for r in self.http.get(f"/api/v1/deployments/{name}").json()["replicas"] if r["state"] == "ready"]
            if reps:
                return str(reps[0]["url"])
            time.sleep(0.1)
        raise RuntimeError(f"{name} has no ready replica")


def _latencies(client: httpx.Client, url: str, n: int, headers: dict[str, str] | None = None) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        r = client.post(url, json={"i": i}, headers=headers)
        out.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()
    return out


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def backends_side_by_side(rounds: int, n: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Cold start and added latency, local vs Ray, interleaved by round."""
    from ballast.cli.packing import pack

    work = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    packed = pack(ROOT / "examples" / "echo", work)
    archive = packed.path.read_bytes()
    cold: dict[str, list[float]] = {"local": [], "ray": []}
    added: dict[str, dict[str, list[float]]] = {b: {"p50": [], "p99": []} for b in ("local", "ray")}
    try:
        with ray_cluster() as address, running([]) as procs:
            plats = {"local": Platform("local", procs, work / "local"),
                     "ray": Platform("ray", procs, work / "ray", address)}
            for p in plats.values():
                p.deploy("echo", archive, packed.sha256)
                p.replica_url("echo")
            for rnd in range(rounds):
                for b, p in plats.items():
                    cold[b].append(p.cold_start(f"cold-{rnd}", archive, packed.sha256))
                    p.delete(f"cold-{rnd}")  # and wait until its replica is gone (it holds a CPU on Ray)
                    with httpx.Client(timeout=30) as c:
                        direct = _latencies(c, p.replica_url("echo") + "/predict", n)
                        via = _latencies(c, p.url + "/deployments/echo/predict", n,
                                         {"Authorization": f"Bearer {p.key}"})
                    for q in ("p50", "p99"):
                        added[b][q].append(_pct(via, int(q[1:])) - _pct(direct, int(q[1:])))
                    print(f"round {rnd + 1}/{rounds} {b}: cold start {cold[b][-1]:.2f} s, added p50 "
                          f"{added[b]['p50'][-1]:.3f} ms, p99 {added[b]['p99'][-1]:.3f} ms", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows: list[dict[str, Any]] = []
    for b in ("local", "ray"):
        rows.append({"system": b, "metric": "cold_start", **summarize(cold[b]), "unit": "s"})
        for q in ("p50", "p99"):
            rows.append({"system": b, "metric": f"added_{q}@c1", **summarize(added[b][q]), "unit": "ms"})
    return rows, {"cold_start ray/local": ratio_stats(cold["ray"], cold["local"])}


def pool_failover(rounds: int, ray_pools: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Local pools always; with `ray_pools`, the same loss of a pool as the loss of one of two Ray clusters."""
    with running([]) as procs:
        got = {"local+local pools": failover.measure(Platform, procs, rounds)}
    if ray_pools:
        got["ray+ray pools"] = ray_failover.measure(Platform, rounds)
    units = {"detect_s": "s", "restored_s": "s", "failed": "requests", "requests": "requests"}
    rows = [{"system": system, "metric": f"pool_failover_{k}", **summarize(v), "unit": units[k]}
            for system, values in got.items() for k, v in values.items()]
    ratios = {} if not ray_pools else {
        "pool_failover_restored ray/local": ratio_stats(got["ray+ray pools"]["restored_s"],
                                                        got["local+local pools"]["restored_s"])}
    return rows, ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds, 200 requests per latency run")
    ap.add_argument("--rounds", type=int, help="rounds (default 5; quick 2)")
    ap.add_argument("--requests", type=int, help="requests per latency run (default 2000; quick 200)")
    ap.add_argument("--failover-only", action="store_true", help="only the pool failover rounds (no Ray)")
    ap.add_argument("--ray-pools", action="store_true",
                    help="with --failover-only: also the rounds with two Ray clusters as pools")
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    n = args.requests or (200 if args.quick else 2000)
    stop_on_sigterm()
    rows: list[dict[str, Any]] = []
    ratios: dict[str, Any] = {}
    if not args.failover_only:
        rows, ratios = backends_side_by_side(rounds, n)
    ray_pools = args.ray_pools or not args.failover_only
    more, more_ratios = pool_failover(rounds, ray_pools)
    rows += more
    ratios.update(more_ratios)
    print_table(rows)
    print_ratios(ratios, {})
    params = {"rounds": rounds, "requests": n, "quick": args.quick, "failover_only": args.failover_only,
              "ray_pools": ray_pools}
    out = write_results("scaleout-failover" if args.failover_only else "scaleout", params, rows, ratios)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
