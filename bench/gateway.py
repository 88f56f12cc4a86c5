"""Gateway overhead: the latency a proxy adds and the requests/s it carries, in front of one echo backend.

One command: `python bench/gateway.py [--quick]`. It starts the Ballast platform (`ballast up`), deploys
bench/peers/echo_chat (an OpenAI-shaped chat-completions echo: the backend does no work, so each proxy's own
cost shows), and puts three proxies in front of that one replica process:

  direct   wrk straight to the replica: the baseline
  ballast  the Ballast gateway (`ballast up`): API-key check, limits, route resolution, least-outstanding
           choice, usage metering and metrics on every request
  litellm  LiteLLM's proxy (its own venv under bench/.venvs/litellm), model `echo` -> `openai/echo` at the
           replica's /v1, one worker, a master key (checked per request), no database (so no per-key limits
           or spend tracking: it does less per request than Ballast)
  nginx    nginx (Debian package) as a reverse proxy with upstream keep-alive: the floor

Every proxy runs pinned to CPU 0; the backend replica and wrk share CPU 1 (the same for every system). wrk
sends the same POST /v1/chat/completions body, first with 1 connection (added latency: p50/p99 minus
direct's), then with 64 (maximum requests/s), interleaved by round (direct ballast litellm nginx, ...).
Results: bench/results/gateway.json and a table; ratios are per round, reported as median (min-max).
"""

from __future__ import annotations

import argparse
import json
import os
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
    free_port,
    print_table,
    require_wrk,
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


def start_ballast(tmp: Path, procs: list[Proc]) -> tuple[str, str, str]:
    """The platform on CPU 0 with the echo deployed; returns (gateway url, admin key, replica url)."""
    home = tmp / "home"
    home.mkdir()
    port = free_port()
    procs.append(Proc([ballast_cli(), "up", "--port", str(port), "--no-isolation"], cpus=PROXY_CPUS,
                      env={"BALLAST_HOME": str(home)}, log=tmp / "ballast.log"))
    url = f"http://127.0.0.1:{port}"
    procs[-1].wait_http(url + "/api/v1/health", timeout=120)
    key = json.loads((home / "credentials.json").read_text())["api_key"]
    api = httpx.Client(base_url=url + "/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    r = api.post("/deployments", json={"path": str(PACKAGE), "name": "echo"})
    r.raise_for_status()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        reps = [x for x in api.get("/deployments/echo").json()["replicas"] if x["state"] == "ready"]
        if reps:
            break
        time.sleep(0.2)
    else:
        raise RuntimeError(f"the echo replica did not become ready; see {tmp / 'ballast.log'}")
    pin_tree(reps[0]["pid"], BACKEND_CPUS)  # the backend shares CPU 1 with wrk, as for every system
    return url, key, reps[0]["url"]


LITELLM_KEY = "sk-" + "b" * 48  # LiteLLM refuses to start without a master key; it checks it per request


def start_litellm(tmp: Path, backend: str, procs: list[Proc]) -> str:
    py = venv_python("litellm", "litellm[proxy]")
    cfg = tmp / "litellm.yaml"
    cfg.write_text(json.dumps({
        "model_list": [{"model_name": "echo", "litellm_params": {"model": "openai/echo", "api_base": backend + "/v1",
                                                                   "api_key": "unused"}}],
        "litellm_settings": {"telemetry": False, "drop_params": True},
        "general_settings": {"master_key": LITELLM_KEY},
    }))
    port = free_port()
    litellm = py.parent / "litellm"
    procs.append(Proc([str(litellm), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
                       "--num_workers", "1"], cpus=PROXY_CPUS, log=tmp / "litellm.log",
                      env={"LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR", "NO_DOCS": "True"}))
    procs[-1].wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=300)
    return f"http://127.0.0.1:{port}"


def start_nginx(tmp: Path, backend: str, procs: list[Proc]) -> str:
    nginx = "/usr/sbin/nginx"
    if not Path(nginx).exists():
        sys.exit("this benchmark needs nginx: `apt-get install -y nginx` (Debian/Ubuntu)")
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


def ratio(num: list[float], den: list[float]) -> dict[str, float]:
    return summarize([a / b for a, b in zip(num, den, strict=True)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 3 s (about 2 minutes after installs)")
    ap.add_argument("--rounds", type=int, help="rounds (default 5)")
    ap.add_argument("--seconds", type=int, help="seconds of load per system, concurrency and round (default 8)")
    ap.add_argument("--connections", type=int, default=64, help="connections for the throughput runs")
    a = ap.parse_args()
    require_wrk()
    stop_on_sigterm()
    rounds = a.rounds or (2 if a.quick else 5)
    seconds = a.seconds or (3 if a.quick else 8)
    conc = [1, a.connections]
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    load_before = os.getloadavg()
    started = time.monotonic()
    samples: dict[tuple[str, int], list[dict[str, float]]] = {}
    with running([]) as procs:
        gw, key, backend = start_ballast(tmp, procs)
        systems: dict[str, dict[str, Any]] = {
            "direct": {"url": backend + "/v1/chat/completions", "headers": {}},
            "ballast": {"url": gw + "/v1/chat/completions", "headers": {"Authorization": f"Bearer {key}"}},
            "litellm": {"url": start_litellm(tmp, backend, procs) + "/v1/chat/completions",
                        "headers": {"Authorization": f"Bearer {LITELLM_KEY}"}},
            "nginx": {"url": start_nginx(tmp, backend, procs) + "/v1/chat/completions", "headers": {}},
        }
        for name, s in systems.items():
            check(name, s["url"], s["headers"])
        print(f"all up; logs in {tmp}", flush=True)
        for c in conc:  # warm-up: connections, pools, caches
            for s in systems.values():
                wrk(s["url"], BODY, connections=c, seconds=2, cpus=BACKEND_CPUS, headers=s["headers"])
        for r in range(rounds):
            for c in conc:
                for name, s in systems.items():
                    res = wrk(s["url"], BODY, connections=c, seconds=seconds, cpus=BACKEND_CPUS, headers=s["headers"],
                              timeout_s=30)
                    samples.setdefault((name, c), []).append(res)
                    print(f"round {r + 1}/{rounds} c={c:<3} {name:<8} {res['rps']:8.0f} req/s  "
                          f"p50 {res['p50_ms']:7.3f} ms  p99 {res['p99_ms']:7.3f} ms  errors {res['errors']:.0f}",
                          flush=True)
    load_after = os.getloadavg()

    rows = []
    for (name, c), rs in samples.items():
        for metric, unit in (("rps", "req/s"), ("p50_ms", "ms"), ("p99_ms", "ms"), ("errors", "count")):
            rows.append({"system": name, "metric": f"{metric}@c{c}", **summarize([x[metric] for x in rs]),
                         "unit": unit})
    hi = a.connections
    ratios: dict[str, Any] = {}
    for name in SYSTEMS[1:]:
        for pct in ("p50_ms", "p99_ms"):
            added = [x[pct] - d[pct] for x, d in zip(samples[(name, 1)], samples[("direct", 1)], strict=True)]
            rows.append({"system": name, "metric": f"added_{pct}@c1", **summarize(added), "unit": "ms"})
        ratios[f"{name}/direct rps@c{hi}"] = ratio([x["rps"] for x in samples[(name, hi)]],
                                                   [x["rps"] for x in samples[("direct", hi)]])
    for peer in ("litellm", "nginx"):
        ratios[f"ballast/{peer} rps@c{hi}"] = ratio([x["rps"] for x in samples[("ballast", hi)]],
                                                   [x["rps"] for x in samples[(peer, hi)]])
    added_p50 = summarize([x["p50_ms"] - d["p50_ms"] for x, d in zip(samples[("ballast", 1)],
                                                                      samples[("direct", 1)], strict=True)])
    ratios["aim"] = {"ballast adds < 1 ms at p50": added_p50["median"] < 1.0,
                     "ballast >= 3x litellm rps": ratios[f"ballast/litellm rps@c{hi}"]["median"] >= 3.0}
    params = {
        "rounds": rounds, "seconds_per_run": seconds, "concurrency": conc, "body": BODY,
        "order": "interleaved per round: " + " ".join(SYSTEMS), "warmup": "2 s per system per concurrency",
        "load_generator": "wrk, 1 thread, keep-alive connections, POST JSON, closed loop, loopback",
        "pinning": f"proxies (each process with all its threads) on CPU {PROXY_CPUS}; the backend replica and wrk "
                   f"on CPU {BACKEND_CPUS}",
        "backend": "one `ballast serve` replica of bench/peers/echo_chat (async chat_completions echo) started by "
                   "the platform; every system reaches the same process",
        "ballast": "`ballast up --no-isolation` defaults, SQLite store; the admin key as Bearer; the gateway "
                   "does key lookup, limits, model resolution, replica choice, metering and metrics per request",
        "litellm": "`litellm --config <model echo -> openai/echo> --num_workers 1`, master key as Bearer, no database, "
                   "telemetry off, LITELLM_LOG=ERROR",
        "nginx": "1 worker, proxy_http_version 1.1, upstream keepalive 128, proxy_buffering off, access_log off",
        "versions": versions("ballast", "uvicorn", "starlette", "aiohttp"),
        "versions_litellm_venv": versions("litellm", python=ROOT / "bench" / ".venvs" / "litellm" / "bin" / "python"),
        "nginx_version": subprocess.run(["/usr/sbin/nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "wall_s": round(time.monotonic() - started, 1),
    }
    out = write_results("gateway", params, rows, ratios)
    print()
    print_table(rows)
    print("\n| ratio | median | min | max |\n|---|---:|---:|---:|")
    for k, v in ratios.items():
        if k != "aim":
            print(f"| {k} | {v['median']:.3f} | {v['min']:.3f} | {v['max']:.3f} |")
    print()
    for k, ok in ratios["aim"].items():
        print(f"aim {k}: {'yes' if ok else 'NO'}")
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} (2 CPUs); wrote {out}")


if __name__ == "__main__":
    main()
