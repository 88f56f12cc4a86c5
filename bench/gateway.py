"""Gateway overhead: the latency a proxy adds and the requests/s it carries, in front of one echo backend.

One command: `python bench/gateway.py [--quick]`. It starts the Ballast platform (`ballast up`), deploys
bench/peers/echo_chat (an OpenAI-shaped chat-completions echo, min = max = 1 replica: the backend does no work,
so each proxy's own cost shows), and puts three proxies in front of that one replica process:

  direct   wrk straight to the replica (a `ballast serve` process, started by the platform): the baseline
  ballast  the Ballast gateway (`ballast up`): API-key check, limits, route resolution, replica choice,
           usage metering and metrics on every request
  litellm  LiteLLM's proxy (its own venv under bench/.venvs/litellm), model `echo` -> `openai/echo` at the
           replica's /v1, default worker count, a master key (checked per request), no database (so no
           per-key limits or spend tracking: it does less per request than Ballast)
  nginx    nginx (Debian package) as a reverse proxy with HTTP/1.1 upstream keep-alive: the floor

Every proxy runs pinned to CPU 0; the backend replica and wrk share CPU 1 (the same for every system). wrk
sends the same POST /v1/chat/completions body, first with 1 connection (added latency: p50/p99 minus
direct's in the same round), then with 64 (maximum requests/s), interleaved by round (direct ballast litellm
nginx, ...). The CPU time each proxy and the backend use per request (from /proc) is recorded too: it is the
steadier cost figure on a shared machine. Results: bench/results/gateway.json and a table; ratios are per
round, reported as median (min-max). Installs wrk and nginx with apt-get when missing (as root).
"""

from __future__ import annotations

import argparse
import json
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
    process_tree,
    ratio_stats,
    running,
    stop_on_sigterm,
    summarize,
    venv_python,
    versions,
    write_results,
    wrk,
)

PROXY_CPUS, BACKEND_CPUS = "0", "1"
PACKAGE = ROOT / "bench" / "peers" / "echo_chat"
BODY = {"model": "echo", "messages": [{"role": "user", "content": "hello gateway"}]}
SYSTEMS = ("direct", "ballast", "litellm", "nginx")


def pin_tree(pid: int, cpus: str) -> None:
    """Move a running process (all its threads) to `cpus`."""
    subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True, capture_output=True)


def ensure_tool(binary: str, package: str) -> str:
    """The path of `binary`, installed from the Debian package `package` first if it is missing (as root)."""
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        print(f"installing {package} (apt-get) ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, timeout=600, check=True)
            subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, timeout=600, check=True)
        found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
    if found is None:
        sys.exit(f"this benchmark needs {binary}: `apt-get install -y {package}` (Debian/Ubuntu)")
    return found


def cpu_seconds(pid: int, exclude: int | None = None) -> float:
    """CPU seconds (user+system, all threads) of `pid` and its descendants, less the subtree of `exclude`."""
    tree = process_tree(pid)
    skip = process_tree(exclude) if exclude is not None else {}
    return sum(cpu for p, (_, _, cpu) in tree.items() if p not in skip)


def start_ballast(tmp: Path, procs: list[Proc]) -> tuple[str, str, str, int]:
    """The platform on CPU 0 with the echo deployed; returns (gateway url, admin key, replica url, replica pid)."""
    home = tmp / "home"
    home.mkdir()
    port = free_port()
    procs.append(Proc([ballast_cli(), "up", "--port", str(port), "--no-isolation"], cpus=PROXY_CPUS,
                      env={"BALLAST_HOME": str(home)}, log=tmp / "ballast.log"))
    url = f"http://127.0.0.1:{port}"
    procs[-1].wait_http(url + "/api/v1/health", timeout=120)
    key, reps = deploy_ready(url, home, PACKAGE, "echo", tmp / "ballast.log")
    if len(reps) != 1:
        raise RuntimeError(f"expected exactly one echo replica, found {len(reps)}")
    rep = reps[0]
    pin_tree(rep["pid"], BACKEND_CPUS)  # the backend shares CPU 1 with wrk, as for every system
    return url, key, rep["url"], rep["pid"]


LITELLM_KEY = "sk-" + "b" * 48  # a master key, so that LiteLLM checks a key on every request as Ballast does
# Documented switches that only keep LiteLLM quiet and offline: no telemetry, the bundled model cost map (no
# fetch from GitHub at start), errors-only logging. Nothing that changes its request path.
LITELLM_ENV = {"LITELLM_TELEMETRY_DISABLED": "true", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}


def start_litellm(tmp: Path, backend: str, procs: list[Proc]) -> str:
    py = venv_python("litellm", "litellm[proxy]")
    cfg = tmp / "litellm.yaml"
    cfg.write_text(json.dumps({
        "model_list": [{"model_name": "echo", "litellm_params": {"model": "openai/echo", "api_base": backend + "/v1",
                                                                   "api_key": "unused"}}],
        "general_settings": {"master_key": LITELLM_KEY},
    }))
    port = free_port()
    litellm = py.parent / "litellm"
    # Its default worker count (--num_workers unset: one uvicorn worker in this version).
    procs.append(Proc([str(litellm), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)],
                      cpus=PROXY_CPUS, log=tmp / "litellm.log", env=LITELLM_ENV))
    procs[-1].wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=300)
    return f"http://127.0.0.1:{port}"


def start_nginx(tmp: Path, backend: str, procs: list[Proc], nginx: str) -> str:
    port = free_port()
    root = tmp / "nginx"
    root.mkdir()
    upstream = backend.removeprefix("http://")
    (root / "nginx.conf").write_text(f"""
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {root}/body; proxy_temp_path {root}/proxy; fastcgi_temp_path {root}/fastcgi;
  uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;
  upstream backend {{ server {upstream}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
""")
    procs.append(Proc([nginx, "-p", str(root), "-c", str(root / "nginx.conf"), "-g", "daemon off;"],
                      cpus=PROXY_CPUS, log=tmp / "nginx.log"))
    procs[-1].wait_http(f"http://127.0.0.1:{port}/health/live", timeout=30)
    return f"http://127.0.0.1:{port}"


def check(name: str, url: str, headers: dict[str, str]) -> None:
    r = httpx.post(url, json=BODY, headers=headers, timeout=30)
    if r.status_code != 200 or r.json()["choices"][0]["message"]["content"] != "hello gateway":
        raise RuntimeError(f"{name} answered {r.status_code}: {r.text[:300]}")


def version_line(cmd: list[str]) -> str | None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    lines = (out.stdout + out.stderr).strip().splitlines()
    return lines[0].strip() if lines else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 3 s (about 2 minutes after installs)")
    ap.add_argument("--rounds", type=int, help="rounds (default 5; quick 2)")
    ap.add_argument("--seconds", type=int, help="seconds per run (default 8; quick 3)")
    ap.add_argument("--connections", type=int, default=64, help="connections for the throughput runs (default 64)")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads for the throughput runs (default 2)")
    a = ap.parse_args()
    wrk_bin = ensure_tool("wrk", "wrk")
    nginx_bin = ensure_tool("nginx", "nginx")
    stop_on_sigterm()
    rounds = a.rounds or (2 if a.quick else 5)
    seconds = a.seconds or (3 if a.quick else 8)
    hi = a.connections
    conc = [1, hi]
    threads = {1: 1, hi: max(1, min(a.threads, hi))}
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    load_before = os.getloadavg()
    started = time.monotonic()
    samples: dict[tuple[str, int], list[dict[str, float]]] = {}
    with running([]) as procs:
        gw, key, backend, replica_pid = start_ballast(tmp, procs)
        platform_pid = procs[0].proc.pid
        litellm = start_litellm(tmp, backend, procs)
        litellm_pid = procs[-1].proc.pid
        nginx = start_nginx(tmp, backend, procs, nginx_bin)
        nginx_pid = procs[-1].proc.pid
        # url, headers, and the proxy's CPU counter (the platform less its replica; none for direct)
        systems: dict[str, dict[str, Any]] = {
            "direct": {"url": backend + "/v1/chat/completions", "headers": {}, "cpu": None},
            "ballast": {"url": gw + "/v1/chat/completions", "headers": {"Authorization": f"Bearer {key}"},
                        "cpu": lambda: cpu_seconds(platform_pid, exclude=replica_pid)},
            "litellm": {"url": litellm + "/v1/chat/completions", "headers": {"Authorization": f"Bearer {LITELLM_KEY}"},
                        "cpu": lambda: cpu_seconds(litellm_pid)},
            "nginx": {"url": nginx + "/v1/chat/completions", "headers": {}, "cpu": lambda: cpu_seconds(nginx_pid)},
        }
        for name, s in systems.items():
            check(name, s["url"], s["headers"])
        print(f"all up (wrk {wrk_bin}, nginx {nginx_bin}); logs in {tmp}", flush=True)
        for c in conc:  # warm-up: connections, pools, caches, lazy imports
            for s in systems.values():
                wrk(s["url"], BODY, connections=c, threads=threads[c], seconds=2, cpus=BACKEND_CPUS,
                    headers=s["headers"], timeout_s=30)
        for r in range(rounds):
            for c in conc:
                for name, s in systems.items():
                    p0, b0 = (s["cpu"]() if s["cpu"] else 0.0), cpu_seconds(replica_pid)
                    res = wrk(s["url"], BODY, connections=c, threads=threads[c], seconds=seconds, cpus=BACKEND_CPUS,
                              headers=s["headers"], timeout_s=30)
                    n = max(res["requests"], 1)
                    res["proxy_cpu_us_per_req"] = ((s["cpu"]() - p0) / n * 1e6) if s["cpu"] else 0.0
                    res["backend_cpu_us_per_req"] = (cpu_seconds(replica_pid) - b0) / n * 1e6
                    samples.setdefault((name, c), []).append(res)
                    print(f"round {r + 1}/{rounds} c={c:<3} {name:<8} {res['rps']:8.0f} req/s  "
                          f"p50 {res['p50_ms']:7.3f} ms  p99 {res['p99_ms']:8.3f} ms  "
                          f"cpu proxy {res['proxy_cpu_us_per_req']:6.0f} us/req  "
                          f"backend {res['backend_cpu_us_per_req']:4.0f} us/req  errors {res['errors']:.0f}",
                          flush=True)
    load_after = os.getloadavg()

    rows = []
    for (name, c), rs in samples.items():
        for metric, unit in (("rps", "req/s"), ("p50_ms", "ms"), ("p99_ms", "ms"), ("proxy_cpu_us_per_req", "us"),
                             ("backend_cpu_us_per_req", "us"), ("errors", "count")):
            if metric == "proxy_cpu_us_per_req" and name == "direct":
                continue
            rows.append({"system": name, "metric": f"{metric}@c{c}", **summarize([x[metric] for x in rs]),
                         "unit": unit})

    def added(name: str, pct: str) -> list[float]:  # system minus direct, round by round
        return [x[pct] - d[pct] for x, d in zip(samples[(name, 1)], samples[("direct", 1)], strict=True)]

    def col(name: str, c: int, metric: str) -> list[float]:
        return [x[metric] for x in samples[(name, c)]]

    for name in SYSTEMS[1:]:
        for pct in ("p50_ms", "p99_ms"):
            rows.append({"system": name, "metric": f"added_{pct}@c1", **summarize(added(name, pct)), "unit": "ms"})
    ratios: dict[str, Any] = {}
    for name in SYSTEMS[1:]:
        ratios[f"{name}/direct rps@c{hi}"] = ratio_stats(col(name, hi, "rps"), col("direct", hi, "rps"))
    for peer in ("litellm", "nginx"):
        ratios[f"ballast/{peer} rps@c{hi}"] = ratio_stats(col("ballast", hi, "rps"), col(peer, hi, "rps"))
        ratios[f"ballast/{peer} added_p50@c1"] = ratio_stats(added("ballast", "p50_ms"), added(peer, "p50_ms"))
        ratios[f"ballast/{peer} added_p99@c1"] = ratio_stats(added("ballast", "p99_ms"), added(peer, "p99_ms"))
        ratios[f"ballast/{peer} proxy_cpu_us_per_req@c{hi}"] = ratio_stats(col("ballast", hi, "proxy_cpu_us_per_req"),
                                                                    col(peer, hi, "proxy_cpu_us_per_req"))
    added_p50 = summarize(added("ballast", "p50_ms"))
    ratios["aim"] = {"ballast adds < 1 ms at p50": added_p50["median"] < 1.0,
                     f"ballast >= 3x litellm rps@c{hi}": ratios[f"ballast/litellm rps@c{hi}"]["median"] >= 3.0}
    litellm_py = ROOT / "bench" / ".venvs" / "litellm" / "bin" / "python"
    params = {
        "rounds": rounds, "seconds_per_run": seconds, "concurrency": conc,
        "wrk_threads": {f"c{c}": t for c, t in threads.items()}, "body": BODY, "wrk_timeout_s": 30,
        "order": "interleaved per round: c1 then c" + str(hi) + ", each " + " ".join(SYSTEMS),
        "warmup": "2 s per system per concurrency",
        "load_generator": "wrk, keep-alive connections, POST JSON, closed loop, loopback (127.0.0.1)",
        "pinning": f"each proxy (its process tree, all threads; for ballast the platform process) on CPU "
                   f"{PROXY_CPUS}; the backend replica and wrk on CPU {BACKEND_CPUS} (taskset), so a proxy never "
                   "competes with the backend or the load generator; all servers up at once, one under load at a "
                   "time. For direct, CPU 0 is idle",
        "backend": "one `ballast serve` replica of bench/peers/echo_chat (async chat_completions echo, "
                   "predict_concurrency 64, max_queue 1024, min = max = 1 replica), started by the platform with "
                   "--no-isolation; every system reaches this same process",
        "ballast": "`ballast up --no-isolation` defaults (SQLite store in a temporary BALLAST_HOME), "
                   "deployment via POST /api/v1/deployments; the admin key as Bearer; per request: key lookup, "
                   "limits, model resolution, replica choice, metering and Prometheus metrics",
        "litellm": "`litellm --config <model echo -> openai/echo, api_base <replica>/v1, api_key unused; "
                   "general_settings.master_key>` with its default worker count (1 in this version), no database, "
                   "env " + " ".join(f"{k}={v}" for k, v in LITELLM_ENV.items()) + "; master key as Bearer",
        "nginx": "1 worker process, proxy_pass to an upstream with keepalive 128, proxy_http_version 1.1, "
                 "Connection \"\", proxy_buffering off, access_log off; nginx -c <tmp>/nginx.conf -g 'daemon off;'",
        "cpu_us_per_req": "CPU time (user+system from /proc, all threads) per request served in the run: "
                          "proxy = the proxy's processes (ballast: the platform less its replica), backend = the "
                          "replica",
        "added_latency": "system minus direct at c1, per round (same round), then median/min/max",
        "versions": versions("ballast", "uvicorn", "starlette", "aiohttp", "uvloop", "httptools"),
        "versions_litellm_venv": versions("litellm", "uvicorn", "fastapi", python=litellm_py),
        "nginx_version": version_line([nginx_bin, "-v"]), "wrk_version": version_line([wrk_bin, "-v"]),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "wall_s": round(time.monotonic() - started, 1),
        "ratios": "per-round ratios (median, min, max over rounds) and the ratio of medians",
    }
    out = write_results("gateway", params, rows, ratios)
    print()
    print_table(rows)
    print_ratios(ratios, ratios["aim"])
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs); wrote {out}")


if __name__ == "__main__":
    main()
