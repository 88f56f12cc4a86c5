"""The cost of the metrics history and the speed of the dashboard.

  history  a `ballast up` sampling every 10 s (the default) into its store
  off      the same platform with BALLAST_METRICS_INTERVAL_S=0 (no sampler)

Both serve the echo example (one replica each) and are driven in turn (A B A B ...) by the same closed-loop wrk
load through the gateway (`/deployments/echo/predict`). Each platform runs pinned to CPU 0, replicas and wrk on
CPU 1, so a platform's CPU seconds are its own. Reported per round:

- requests/s through each gateway, and the platform's CPU seconds per 1,000 requests (ratio history / off);
- the sampler's own CPU per sample (`ballast_metrics_history_cpu_seconds` / samples, read from the platform's
  /metrics), idle and under load, and what it adds as a share of one core at one sample per 10 s. The sampler's
  cost does not depend on the request rate (nothing is recorded per request); the ratio shows that end to end.

Then the dashboard: a day of 10 s points and a week of 5-minute points are written into the history platform's
store, and headless Chromium (Playwright, the system executable) loads the deployment page; the time from
navigation start to the first rendered charts (the page's own `performance.now()`), for each range, over loopback.

  python bench/dashboard.py [--quick]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
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
    running,
    stop_on_sigterm,
    summarize,
    write_results,
    wrk,
)

PACKAGE = ROOT / "examples" / "echo"
PLATFORM_CPUS, BACKEND_CPUS = "0", "1"
BODY = {"text": "hello dashboard"}


def start(tmp: Path, name: str, interval: int, procs: list[Proc]) -> dict[str, Any]:
    home = tmp / name
    home.mkdir()
    port = free_port()
    env = {"BALLAST_HOME": str(home), "BALLAST_METRICS_INTERVAL_S": str(interval)}
    procs.append(Proc([ballast_cli(), "up", "--port", str(port), "--no-isolation"], cpus=PLATFORM_CPUS, env=env,
                      log=tmp / f"{name}.log"))
    url = f"http://127.0.0.1:{port}"
    procs[-1].wait_http(url + "/api/v1/health", timeout=120)
    key, (rep, *_) = deploy_ready(url, home, PACKAGE, "echo", tmp / f"{name}.log")
    subprocess.run(["taskset", "-a", "-p", "-c", BACKEND_CPUS, str(rep["pid"])], check=True, capture_output=True)
    return {"name": name, "url": url, "key": key, "home": home, "proc": procs[-1], "replica_pid": rep["pid"]}


def platform_cpu(p: dict[str, Any]) -> float:
    """CPU seconds of the platform process alone (its replicas excluded)."""
    tree = process_tree(p["proc"].proc.pid)
    skip = process_tree(p["replica_pid"])
    return sum(cpu for pid, (_, _, cpu) in tree.items() if pid not in skip)


def sampler_counters(p: dict[str, Any]) -> tuple[float, float]:
    text = httpx.get(p["url"] + "/metrics", headers={"Authorization": f"Bearer {p['key']}"}, timeout=10).text

    def value(name: str) -> float:
        m = re.search(rf"^{name}_total ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    return value("ballast_metrics_history_cpu_seconds"), value("ballast_metrics_history_samples")


def per_sample(p: dict[str, Any], before: tuple[float, float]) -> float | None:
    cpu, n = sampler_counters(p)
    return (cpu - before[0]) / (n - before[1]) if n > before[1] else None


def prefill(p: dict[str, Any], interval: int) -> int:
    """A week of points for `echo` in the platform's store, as if it had run that long: 10 s points for the last
    day, 5-minute points for the week."""
    from ballast.control.metrics_history import COARSE_S, FINE_KEEP_S, MetricsHistory, Window
    from ballast.store import open_store

    _engine, sessions = open_store(f"sqlite:///{p['home'] / 'state.db'}")
    history = MetricsHistory(sessions, interval)
    now = int(time.time())
    w = Window(seconds=interval, counters={"requests_2xx": 900.0, "requests_5xx": 3.0},
               histograms={"latency": {0.005: 600.0, 0.01: 250.0, 0.05: 50.0, float("inf"): 3.0}},
               gauges={"replicas_ready": [1.0], "replicas_desired": [1.0]})
    points = [(interval, t) for t in range(now // interval * interval - FINE_KEEP_S, now - 60, interval)]
    points += [(COARSE_S, t) for t in range(now // COARSE_S * COARSE_S - 7 * 86_400, now - COARSE_S, COARSE_S)]
    for resolution, t in points:
        history.write(resolution, t, {"echo": w.values()})
    return len(points)


def page_load(p: dict[str, Any], ranges: list[str], rounds: int) -> dict[str, list[float]]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    out: dict[str, list[float]] = {r: [] for r in ranges}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        ctx = browser.new_context(base_url=p["url"])
        page = ctx.new_page()
        page.goto("/")
        page.get_by_label("API key").fill(p["key"])
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(p["url"] + "/")
        for _ in range(rounds):
            for r in ranges:
                page.goto(f"/ui/deployments/echo?range={r}")
                page.wait_for_selector("#charts[data-rendered-ms]", timeout=30_000)
                out[r].append(float(page.get_attribute("#charts", "data-rendered-ms") or "nan"))
        browser.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 12 s")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=30, help="wrk seconds per round and platform")
    ap.add_argument("--connections", type=int, default=16)
    args = ap.parse_args()
    rounds, seconds = (3, 12) if args.quick else (args.rounds, args.seconds)
    stop_on_sigterm()
    tmp = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    with running([]) as procs:
        systems = [start(tmp, "history", 10, procs), start(tmp, "off", 0, procs)]
        hist = systems[0]
        print(f"both up; logs in {tmp}", flush=True)
        idle_before = sampler_counters(hist)
        time.sleep(21)
        idle = per_sample(hist, idle_before)
        data: dict[str, dict[str, list[float]]] = {s["name"]: {"rps": [], "cpu_per_1k": []} for s in systems}
        loaded: list[float] = []
        for i in range(rounds):
            for s in systems:
                before_cpu = platform_cpu(s)
                before_sampler = sampler_counters(s) if s is hist else (0.0, 0.0)
                res = wrk(s["url"] + "/deployments/echo/predict", BODY, connections=args.connections,
                          seconds=seconds, cpus=BACKEND_CPUS, headers={"Authorization": f"Bearer {s['key']}"})
                used = platform_cpu(s) - before_cpu
                data[s["name"]]["rps"].append(res["rps"])
                data[s["name"]]["cpu_per_1k"].append(used / max(1, res["requests"]) * 1000)
                if s is hist:
                    v = per_sample(s, before_sampler)
                    if v is not None:
                        loaded.append(v)
                print(f"round {i + 1} {s['name']}: {res['rps']:.0f} req/s, {used:.2f} CPU s, errors {res['errors']}",
                      flush=True)
        points = prefill(hist, 10)
        loads = page_load(hist, ["15m", "1h", "24h", "7d"], rounds)
    rows = [{"system": n, "metric": m, **summarize(v), "unit": u} for n, d in data.items()
            for m, v, u in (("requests/s", d["rps"], "req/s"), ("platform CPU per 1k requests", d["cpu_per_1k"],
                                                                  "CPU s"))]
    if loaded:
        rows.append({"system": "history", "metric": "sampler CPU per sample, under load", **summarize(loaded),
                     "unit": "CPU s"})
        rows.append({"system": "history", "metric": "sampler share of a core (1 sample / 10 s)",
                     **summarize([v / 10 * 100 for v in loaded]), "unit": "% of a core"})
    if idle is not None:
        rows.append({"system": "history", "metric": "sampler CPU per sample, idle", "median": idle, "min": idle,
                     "max": idle, "unit": "CPU s"})
    for r, v in loads.items():
        rows.append({"system": "dashboard", "metric": f"page load to a rendered chart, {r}", **summarize(v),
                     "unit": "ms"})
    ratios: dict[str, Any] = {
        "cpu_per_request history/off": {**summarize([a / b for a, b in zip(data["history"]["cpu_per_1k"],
                                                                            data["off"]["cpu_per_1k"], strict=True)]),
                                        "of_medians": statistics.median(data["history"]["cpu_per_1k"])
                                        / statistics.median(data["off"]["cpu_per_1k"])},
    }
    aim = {"sampler < 2% of a core": bool(loaded) and statistics.median(loaded) / 10 < 0.02,
           "page load < 500 ms (every range)": all(statistics.median(v) < 500 for v in loads.values())}
    ratios["aim"] = aim
    params = {"rounds": rounds, "seconds": seconds, "connections": args.connections, "body": BODY,
              "sample_interval_s": 10, "prefilled_points": points,
              "placement": f"platforms on CPU {PLATFORM_CPUS}, replicas and wrk on CPU {BACKEND_CPUS} (taskset)",
              "load_generator": "wrk, keep-alive, closed loop, loopback",
              "page_load": "headless system Chromium via Playwright; performance.now() at the first drawn charts"}
    print_table(rows)
    print_ratios(ratios, aim)
    print(f"results: {write_results('dashboard', params, rows, ratios)}")


if __name__ == "__main__":
    main()
