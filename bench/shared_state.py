"""What sharing gateway state through Redis costs per request (`ballast up --redis-url`), side by side in one run.

One command: `python bench/shared_state.py [--quick]`. It starts a `redis-server` (no persistence, a free port) and
two platforms, each with its own copy of bench/peers/echo_chat (one replica, chat completions answered at once,
`routing: {policy: prefix}` so every request is prefix-routed):

  local        `ballast up`: limits in the process's token buckets, prefix affinity in its router
  redis        `ballast up --redis-url`: the same, shared through Redis
  redis-nolim  the redis platform with its admin key (no limits: no limit script, only the affinity read)

The limited key has rpm, tpm and a monthly token budget far above what the run sends, so every request runs
the whole path and none is refused: with Redis that is one Lua script that charges the previous request's tokens,
admits, and reads the prefix's replica (one awaited round trip per request). wrk sends the
same POST /v1/chat/completions, first over 1 connection (latency: the difference to `local` in the same round
is what Redis adds), then over 64 (requests/s), interleaved by round. Each platform and Redis are pinned to CPU 0
(Redis's work counts against the gateway side); replicas and wrk to CPU 1. Results: bench/results/shared_state.json
and a table; ratios are per round, median (min-max).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    ROOT,
    Proc,
    ballast_cli,
    deploy_ready,
    free_port,
    print_ratios,
    print_table,
    ratio_stats,
    require_wrk,
    running,
    stop_on_sigterm,
    summarize,
    versions,
    write_results,
    wrk,
)

PLATFORM_CPUS, BACKEND_CPUS = "0", "1"
BODY = {"model": "echo", "messages": [{"role": "system", "content": "You are a shared-state benchmark."},
                                      {"role": "user", "content": "hello gateway"}]}
SYSTEMS = ("local", "redis", "redis-nolim")
LIMITS = {"rpm": 10**6, "tpm": 10**9, "token_budget": 2 * 10**9, "per": "month"}


def package(tmp: Path) -> Path:
    """echo_chat, prefix-routed (so the affinity read is on the path of every request)."""
    pkg = tmp / "echo_prefix"
    shutil.copytree(ROOT / "bench" / "peers" / "echo_chat", pkg)
    with (pkg / "ballast.yaml").open("a") as f:
        f.write("routing:\n  policy: prefix\n")
    return pkg


def start_platform(tmp: Path, name: str, procs: list[Proc], pkg: Path, extra: list[str]) -> tuple[str, str, str]:
    """A platform with the echo deployed; returns (gateway url, admin key, a limited key)."""
    home = tmp / name
    home.mkdir()
    port = free_port()
    log = tmp / f"{name}.log"
    procs.append(Proc([ballast_cli(), "up", "--port", str(port), "--no-isolation", *extra], cpus=PLATFORM_CPUS,
                      env={"BALLAST_HOME": str(home)}, log=log))
    url = f"http://127.0.0.1:{port}"
    procs[-1].wait_http(url + "/api/v1/health", timeout=120)
    admin, reps = deploy_ready(url, home, pkg, "echo", log)
    for r in reps:  # every thread of the replica, as bench/gateway.py does
        subprocess.run(["taskset", "-a", "-p", "-c", BACKEND_CPUS, str(r["pid"])], check=True, capture_output=True)
    limited = httpx.post(url + "/api/v1/keys", headers={"Authorization": f"Bearer {admin}"}, timeout=30,
                         json={"scopes": ["inference"], **LIMITS})
    limited.raise_for_status()
    return url, admin, limited.json()["key"]


def check(name: str, url: str, key: str) -> None:
    r = httpx.post(url + "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    if r.status_code != 200:
        raise RuntimeError(f"{name} answered {r.status_code}: {r.text[:300]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 3 s")
    ap.add_argument("--rounds", type=int, help="rounds (default 5; quick 2)")
    ap.add_argument("--seconds", type=int, help="seconds per run (default 6; quick 3)")
    ap.add_argument("--connections", type=int, default=64, help="connections for the throughput runs (default 64)")
    a = ap.parse_args()
    require_wrk()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        sys.exit("this benchmark needs redis-server: `apt-get install -y redis-server` (Debian/Ubuntu)")
    stop_on_sigterm()
    rounds, seconds, hi = a.rounds or (2 if a.quick else 5), a.seconds or (3 if a.quick else 6), a.connections
    tmp = Path(tempfile.mkdtemp(prefix="bench-shared-"))
    started, load_before = time.monotonic(), os.getloadavg()
    samples: dict[tuple[str, int], list[dict[str, float]]] = {}
    with running([]) as procs:
        rport = free_port()
        procs.append(Proc([redis_bin, "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                           "no", "--dir", str(tmp)], cpus=PLATFORM_CPUS, log=tmp / "redis.log"))
        procs[-1].wait_line(r"Ready to accept connections", timeout=30)
        pkg = package(tmp)
        local, _, local_key = start_platform(tmp, "local", procs, pkg, [])
        shared, shared_admin, shared_key = start_platform(tmp, "redis", procs, pkg,
                                                          ["--redis-url", f"redis://127.0.0.1:{rport}/0"])
        systems = {"local": (local, local_key), "redis": (shared, shared_key), "redis-nolim": (shared, shared_admin)}
        for name, (url, key) in systems.items():
            check(name, url, key)
        print(f"all up; logs in {tmp}", flush=True)
        for c in (1, hi):  # warm-up
            for url, key in systems.values():
                wrk(url + "/v1/chat/completions", BODY, connections=c, threads=1 if c == 1 else 2, seconds=2,
                    cpus=BACKEND_CPUS, headers={"Authorization": f"Bearer {key}"}, timeout_s=30)
        for r in range(rounds):
            for c in (1, hi):
                for name, (url, key) in systems.items():
                    res = wrk(url + "/v1/chat/completions", BODY, connections=c, threads=1 if c == 1 else 2,
                              seconds=seconds, cpus=BACKEND_CPUS, headers={"Authorization": f"Bearer {key}"},
                              timeout_s=30)
                    samples.setdefault((name, c), []).append(res)
                    print(f"round {r + 1}/{rounds} c={c:<3} {name:<11} {res['rps']:8.0f} req/s  "
                          f"p50 {res['p50_ms']:7.3f} ms  p99 {res['p99_ms']:8.3f} ms  errors {res['errors']:.0f}",
                          flush=True)
    report(samples, rounds, seconds, hi, started, load_before)


def report(samples: dict[tuple[str, int], list[dict[str, float]]], rounds: int, seconds: int, hi: int,
           started: float, load_before: tuple[float, float, float]) -> None:
    rows: list[dict[str, Any]] = []
    for (name, c), rs in samples.items():
        for metric, unit in (("rps", "req/s"), ("p50_ms", "ms"), ("p99_ms", "ms"), ("errors", "count")):
            rows.append({"system": name, "metric": f"{metric}@c{c}", **summarize([x[metric] for x in rs]),
                         "unit": unit})

    def col(name: str, c: int, metric: str) -> list[float]:
        return [x[metric] for x in samples[(name, c)]]

    for name in SYSTEMS[1:]:
        for pct in ("p50_ms", "p99_ms"):
            diff = [x - y for x, y in zip(col(name, 1, pct), col("local", 1, pct), strict=True)]
            rows.append({"system": name, "metric": f"added_{pct}@c1 (vs local)", **summarize(diff), "unit": "ms"})
    ratios: dict[str, Any] = {}
    for name in SYSTEMS[1:]:
        ratios[f"{name}/local rps@c{hi}"] = ratio_stats(col(name, hi, "rps"), col("local", hi, "rps"))
        ratios[f"{name}/local p50@c1"] = ratio_stats(col(name, 1, "p50_ms"), col("local", 1, "p50_ms"))
    added = summarize([x - y for x, y in zip(col("redis", 1, "p50_ms"), col("local", 1, "p50_ms"), strict=True)])
    ratios["aim"] = {"redis adds < 0.5 ms at p50 (c1)": added["median"] < 0.5}
    load_after = os.getloadavg()
    params = {
        "rounds": rounds, "seconds_per_run": seconds, "concurrency": [1, hi], "body": BODY, "limits": LIMITS,
        "order": f"interleaved per round: c1 then c{hi}, each " + " ".join(SYSTEMS), "warmup": "2 s per system",
        "load_generator": "wrk, keep-alive connections, POST JSON, closed loop, loopback (127.0.0.1)",
        "pinning": f"both platforms and redis-server on CPU {PLATFORM_CPUS} (Redis's work counts against the gateway "
                   f"side); their replicas and wrk on CPU {BACKEND_CPUS}; one platform under load at a time",
        "deployment": "bench/peers/echo_chat with routing.policy prefix, one replica per platform, --no-isolation",
        "per_request_with_redis": "limited key: one EVALSHA (the pending token charge, limits, GETEX of the "
                                  "prefix's replica), awaited; admin key (no limits): one GETEX",
        "versions": versions("ballast", "redis", "uvicorn", "aiohttp"),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "wall_s": round(time.monotonic() - started, 1),
    }
    out = write_results("shared_state", params, rows, ratios)
    print()
    print_table(rows)
    print_ratios(ratios, ratios["aim"])
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs); wrote {out}")


if __name__ == "__main__":
    main()
