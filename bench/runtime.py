"""Runtime overhead: examples/echo under `ballast serve` vs a bare Starlette app vs BentoML.

One command: `python bench/runtime.py [--quick]`. It starts every server once (each pinned to CPU 0, all
threads included), then drives them with wrk (one thread, pinned to CPU 1) in interleaved rounds
(A B C D A B C D ...), the same JSON body, the same concurrency and the same duration for all. Reports
requests/s and p50/p99 latency (medians and min-max over rounds) and ratios Ballast ÷ peer, and writes
bench/results/runtime.json. Needs wrk (`apt-get install -y wrk`); installs BentoML into
bench/.venvs/bentoml on first use.

Systems:
  ballast          `ballast serve examples/echo` (the CLI, default settings; sync predict in its executor)
  bare-threadpool  the floor: a bare Starlette app calling the same sync echo via run_in_threadpool
  bare-inline      the absolute floor: the same app echoing inline in async code (no thread hop)
  bentoml          BentoML serving the same echo as a sync API method, one worker, default settings
"""

from __future__ import annotations

import argparse
import os
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
    print_ratios,
    print_table,
    ratio_stats,
    require_wrk,
    running,
    stop_on_sigterm,
    summarize,
    venv_python,
    versions,
    write_results,
    wrk,
)

PAYLOAD = {"text": "hello ballast", "numbers": [1, 2, 3, 4, 5], "nested": {"a": True, "b": None}}
SERVER_CPUS, LOAD_CPUS = "0", "1"
PEERS = ROOT / "bench" / "peers"
# The bare app runs under the same uvicorn as Ballast, with the options `ballast serve` gives it:
# uvloop, httptools, no access log, keep-alive 30 s, no server header, one process.
UVICORN_OPTS = ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--timeout-keep-alive", "30",
                "--no-server-header", "--workers", "1", "--log-level", "warning"]


def start_servers(tmp: Path, with_bentoml: bool, procs: list[Proc]) -> dict[str, dict[str, Any]]:
    """Start every system (appending to `procs` as it goes, so a failure still stops the ones started)."""
    systems: dict[str, dict[str, Any]] = {}
    port = free_port()
    procs.append(Proc([ballast_cli(), "serve", str(ROOT / "examples" / "echo"), "--port", str(port), "--host",
                       "127.0.0.1"], cpus=SERVER_CPUS, log=tmp / "ballast.log", cwd=ROOT))
    procs[-1].wait_line(r"^ready: http://", timeout=120)
    systems["ballast"] = {"url": f"http://127.0.0.1:{port}/predict", "body": PAYLOAD, "proc": procs[-1]}
    for variant in ("threadpool", "inline"):
        port = free_port()
        procs.append(Proc([sys.executable, "-m", "uvicorn", *UVICORN_OPTS, "--app-dir", str(PEERS), "--host",
                           "127.0.0.1", "--port", str(port), f"bare_echo:{variant}"], cpus=SERVER_CPUS,
                          log=tmp / f"bare-{variant}.log"))
        procs[-1].wait_http(f"http://127.0.0.1:{port}/ready", timeout=60)
        systems[f"bare-{variant}"] = {"url": f"http://127.0.0.1:{port}/predict", "body": PAYLOAD,
                                      "proc": procs[-1]}
    if with_bentoml:
        py = venv_python("bentoml", "bentoml")
        port = free_port()
        procs.append(Proc([str(py), "-m", "bentoml", "serve", "bentoml_echo:Echo", "--host", "127.0.0.1", "--port",
                           str(port)], cpus=SERVER_CPUS, cwd=PEERS, log=tmp / "bentoml.log",
                          env={"BENTOML_DO_NOT_TRACK": "true"}))
        procs[-1].wait_http(f"http://127.0.0.1:{port}/readyz", timeout=300)
        # BentoML maps JSON fields to the API's parameters: the method's `inputs` is the same payload.
        systems["bentoml"] = {"url": f"http://127.0.0.1:{port}/predict", "body": {"inputs": PAYLOAD},
                              "proc": procs[-1]}
    for name, s in systems.items():  # same answer from everyone, or the comparison means nothing
        r = httpx.post(s["url"], json=s["body"], timeout=30)
        if r.status_code != 200 or r.json() != {"echo": PAYLOAD}:
            raise RuntimeError(f"{name} answered {r.status_code} {r.text[:200]}")
    return systems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="about a minute: c=64 only, 3 s rounds")
    ap.add_argument("--rounds", type=int, help="rounds (default 5; at least 5 for quotable figures)")
    ap.add_argument("--seconds", type=int, help="seconds of load per system per round (default 10; quick 3)")
    ap.add_argument("--concurrency", type=int, nargs="+", help="wrk connections (default 16 64; quick 64)")
    ap.add_argument("--no-bentoml", action="store_true", help="skip BentoML (no venv needed)")
    a = ap.parse_args()
    require_wrk()
    stop_on_sigterm()
    rounds = a.rounds or 5
    seconds = a.seconds or (3 if a.quick else 10)
    conc = a.concurrency or ([64] if a.quick else [16, 64])
    tmp = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    load_before = os.getloadavg()
    started = time.monotonic()
    samples: dict[tuple[str, int], list[dict[str, float]]] = {}
    with running([]) as procs:
        systems = start_servers(tmp, not a.no_bentoml, procs)
        print(f"servers up ({', '.join(systems)}); logs in {tmp}", flush=True)
        for c in conc:  # warm up: connections, thread pools, caches
            for s in systems.values():
                wrk(s["url"], s["body"], connections=c, seconds=2, cpus=LOAD_CPUS)
        for r in range(rounds):
            for c in conc:
                for name, s in systems.items():
                    cpu0 = s["proc"].cpu_seconds()
                    res = wrk(s["url"], s["body"], connections=c, seconds=seconds, cpus=LOAD_CPUS)
                    res["cpu_us_per_req"] = (s["proc"].cpu_seconds() - cpu0) / max(res["requests"], 1) * 1e6
                    samples.setdefault((name, c), []).append(res)
                    print(f"round {r + 1}/{rounds} c={c:<3} {name:<16} {res['rps']:8.0f} req/s  "
                          f"p50 {res['p50_ms']:7.2f} ms  p99 {res['p99_ms']:7.2f} ms  "
                          f"cpu {res['cpu_us_per_req']:5.0f} us/req  errors {res['errors']:.0f}", flush=True)
    load_after = os.getloadavg()

    rows = []
    for (name, c), rs in samples.items():
        for metric, unit in (("rps", "req/s"), ("p50_ms", "ms"), ("p99_ms", "ms"), ("cpu_us_per_req", "us"),
                             ("errors", "count")):
            rows.append({"system": name, "metric": f"{metric}@c{c}", **summarize([x[metric] for x in rs]),
                         "unit": unit})
    ratios: dict[str, Any] = {}
    for c in conc:
        for peer in ("bare-threadpool", "bare-inline", "bentoml"):
            if (peer, c) not in samples:
                continue
            for metric in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req"):
                num = [x[metric] for x in samples[("ballast", c)]]
                den = [x[metric] for x in samples[(peer, c)]]
                ratios[f"ballast/{peer} {metric}@c{c}"] = ratio_stats(num, den)
    aim = {}
    for c in conc:
        aim[f"within 15% of bare-threadpool rps@c{c}"] = ratios[f"ballast/bare-threadpool rps@c{c}"]["median"] >= 0.85
        if f"ballast/bentoml rps@c{c}" in ratios:
            aim[f"ahead of bentoml rps@c{c}"] = ratios[f"ballast/bentoml rps@c{c}"]["median"] > 1
    ratios["aim"] = aim

    bentoml_py = ROOT / "bench" / ".venvs" / "bentoml" / "bin" / "python"
    params = {
        "rounds": rounds, "seconds_per_round": seconds, "concurrency": conc, "payload": PAYLOAD,
        "order": "interleaved per round: " + " ".join(systems), "warmup": "2 s per system per concurrency",
        "load_generator": "wrk, 1 thread, keep-alive connections, POST JSON, closed loop, loopback",
        "pinning": f"each server (all its threads and processes) on CPU {SERVER_CPUS}, wrk on CPU {LOAD_CPUS} "
                   "(taskset); all servers up at once, only one under load at a time",
        "ballast": "`ballast serve examples/echo --host 127.0.0.1` defaults: uvicorn (httptools) on a uvloop "
                   "loop, one process, no access log, keep-alive 30 s; predict_concurrency 64, max_queue 1024, "
                   "request_timeout_s 30 (examples/echo/ballast.yaml)",
        "bare": "bench/peers/bare_echo.py under `python -m uvicorn " + " ".join(UVICORN_OPTS) + "`",
        "bentoml": "bench/peers/bentoml_echo.py, `bentoml serve` (one worker, defaults otherwise: threads=1 for "
                   "sync APIs, access log and metrics on), BENTOML_DO_NOT_TRACK=true",
        "versions": versions("ballast", "uvicorn", "starlette", "uvloop", "httptools", "anyio"),
        "versions_bentoml_venv": (versions("bentoml", "uvicorn", "starlette", "uvloop", "httptools", "anyio",
                                           python=bentoml_py) if "bentoml" in systems else None),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "wall_s": round(time.monotonic() - started, 1),
        "cpu_us_per_req": "server CPU time (user+system, all its threads and processes, from /proc) per request "
                          "served during the round: the cost of a request, steadier than req/s on a shared machine",
        "ratios": "per-round ratios Ballast ÷ peer (median, min, max over rounds) and the ratio of medians",
    }
    out = write_results("runtime", params, rows, ratios)
    print()
    print_table(rows)
    print_ratios(ratios, aim)
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} (2 CPUs); wrote {out}")


if __name__ == "__main__":
    main()
