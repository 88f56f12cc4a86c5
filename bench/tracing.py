"""Tracing cost: the latency the gateway adds with tracing off vs on, side by side in one run.

One command: `python bench/tracing.py [--quick] [--baseline /path/to/other/checkout]`. It starts two Ballast
platforms (`ballast up`), each with bench/peers/echo_chat deployed (one replica: the backend does no work, so the
gateway's own cost shows):

  off   no OTEL_EXPORTER_OTLP_ENDPOINT: tracing off, as by default
  on    OTEL_EXPORTER_OTLP_ENDPOINT pointing at a loopback OTLP/HTTP receiver (tests/observe/otlp_receiver.py in
        its own process): a gateway span per request, its traceparent to the replica, the replica's span,
        all batched and exported over OTLP/HTTP
  base  (with --baseline) the same as `off`, from another checkout (e.g. main): is `off` unchanged?

Each platform process is pinned to CPU 0; replicas, the receiver and wrk share CPU 1. wrk sends one POST
/v1/chat/completions at a time (1 connection), first straight to the system's replica (`direct`), then through
its gateway; the added latency is gateway minus direct, per round, for p50 and p99; the platform's CPU time per
request (from /proc, less its replica) is recorded too. Rounds are interleaved (off, on, base, off, on, ...).
On a shared machine those latencies carry milliseconds of noise, so each round also measures the gateway's
tracing work alone, in a child process: CPU time per request on the request's path (SDK spans, no export),
and with the batching OTLP exporter's encoding and sending. Results: bench/results/tracing.json and a table.
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
from bench.gateway import BACKEND_CPUS, BODY, PACKAGE, PROXY_CPUS, check, cpu_seconds, pin_tree


def start_platform(name: str, tmp: Path, procs: list[Proc], env: dict[str, str], source: Path) -> dict[str, Any]:
    """A platform from `source` (a checkout) with the echo deployed; its urls, key and pids."""
    home = tmp / name
    home.mkdir()
    port = free_port()
    cmd = [sys.executable, "-m", "ballast.cli.main", "up", "--port", str(port), "--no-isolation"]
    procs.append(Proc(cmd, cpus=PROXY_CPUS, cwd=source, log=tmp / f"{name}.log",
                      env={"BALLAST_HOME": str(home), "PYTHONPATH": str(source), **env}))
    url = f"http://127.0.0.1:{port}"
    procs[-1].wait_http(url + "/api/v1/health", timeout=120)
    key, (rep, *_) = deploy_ready(url, home, PACKAGE, "echo", tmp / f"{name}.log")
    pin_tree(rep["pid"], BACKEND_CPUS)
    return {"gateway": url + "/v1/chat/completions", "direct": rep["url"] + "/v1/chat/completions",
            "headers": {"Authorization": f"Bearer {key}"}, "pid": procs[-1].proc.pid, "replica_pid": rep["pid"]}


def measure(s: dict[str, Any], seconds: int) -> dict[str, float]:
    """direct, then through the gateway (with the platform's CPU per request): one round of one system."""
    d = wrk(s["direct"], BODY, connections=1, seconds=seconds, cpus=BACKEND_CPUS, timeout_s=30)
    c0 = cpu_seconds(s["pid"], exclude=s["replica_pid"])
    g = wrk(s["gateway"], BODY, connections=1, seconds=seconds, cpus=BACKEND_CPUS, headers=s["headers"], timeout_s=30)
    cpu_us = (cpu_seconds(s["pid"], exclude=s["replica_pid"]) - c0) / max(g["requests"], 1) * 1e6
    return {"direct_p50_ms": d["p50_ms"], "gateway_p50_ms": g["p50_ms"],
            "added_p50_us": (g["p50_ms"] - d["p50_ms"]) * 1e3, "added_p99_us": (g["p99_ms"] - d["p99_ms"]) * 1e3,
            "gateway_rps": g["rps"], "platform_cpu_us_per_req": cpu_us, "errors": d["errors"] + g["errors"]}


def span_cpu(n: int) -> None:
    """(Run in a child with OTEL_EXPORTER_OTLP_ENDPOINT set.) CPU time per request of the gateway's tracing work
    alone: server span with traceparent extraction, GenAI attributes, traceparent out, end. `in_request_us`: with
    an SDK tracer that exports nothing (the part on the request's path); `with_export_us`: with the real one,
    whose batching exporter encodes and sends in a thread (process CPU time counts every thread), flushed before
    the clock stops. Prints JSON."""
    from opentelemetry.sdk.trace import TracerProvider

    from ballast.gateway import spans
    from ballast.gateway.metering import UsageCounts
    from ballast.gateway.proxy import Outcome
    from ballast.observe import tracing

    exporting = tracing.get_tracer("bench-gateway")
    headers = [(b"content-type", b"application/json"), (b"authorization", b"Bearer bk_x"),
               (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]
    counts, outcome = UsageCounts(1, 12, 5), Outcome(status=200)

    def one(tracer: Any, i: int) -> None:
        span = tracing.start_server_span(tracer, "POST /v1/chat/completions", headers, f"rid-{i}")
        tokens = (tracing.span_var.set(span), tracing.trace_id_var.set(tracing.trace_id_of(span)))
        out: dict[str, str] = {}
        attrs = spans.on_route(span, "chat_completions", "echo", "echo", 1, out)
        spans.on_done(span, attrs, outcome, counts)
        tracing.set_error(span, 200)
        span.end()
        tracing.span_var.reset(tokens[0])
        tracing.trace_id_var.reset(tokens[1])

    def cpu_per_request(tracer: Any) -> float:
        for i in range(min(n, 2000)):  # warm-up
            one(tracer, i)
        for p in tracing._providers:
            p.force_flush()
        cpu0 = time.process_time()
        for i in range(n):
            one(tracer, i)
        for p in tracing._providers:
            p.force_flush()
        return (time.process_time() - cpu0) / n * 1e6

    silent = TracerProvider().get_tracer("bench")
    print(json.dumps({"in_request_us": cpu_per_request(silent), "with_export_us": cpu_per_request(exporting)}))


def middleware_us() -> None:
    """(Run in a child, with PYTHONPATH naming the checkout to measure.) CPU time per request of the request-id
    middleware as the platform and replicas build it with tracing off, around an app that answers at once:
    best of 7 runs of 50,000 requests. Prints JSON."""
    import asyncio

    from ballast.observe.requests import RequestIdMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message: Any) -> None:
        pass

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "headers": [(b"content-type", b"application/json"), (b"authorization", b"Bearer bk_x")]}
    mw = RequestIdMiddleware(app)

    async def run() -> float:
        for _ in range(20000):
            await mw(scope, receive, send)
        best = float("inf")
        for _ in range(7):
            c = time.process_time()
            for _ in range(50000):
                await mw(scope, receive, send)
            best = min(best, (time.process_time() - c) / 50000 * 1e6)
        return best

    print(json.dumps({"middleware_off_us": asyncio.run(run())}))


def calibrate() -> float:
    """CPU microseconds of a fixed pure-Python loop: how slow this machine is right now."""
    t0 = time.process_time()
    for _ in range(20000):
        sum(range(100))
    return (time.process_time() - t0) / 20000 * 1e6


def child_json(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run this file in a child process with `args` and read the JSON line it prints."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def micro_spans(receiver: str, rounds: int) -> list[dict[str, float]]:
    """The gateway's tracing work alone, per round, exporting to the receiver; with the machine's calibration."""
    micro = []
    for _ in range(rounds):
        res = child_json(["--span-cpu", "5000"], {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver, "PYTHONPATH": str(ROOT)})
        micro.append({**res, "calibration_us": calibrate()})
        print(f"span work alone: {res['in_request_us']:.1f} us CPU/request on the request's path, "
              f"{res['with_export_us']:.1f} with the export (calibration loop {micro[-1]['calibration_us']:.2f} us)",
              flush=True)
    return micro


def micro_middleware(sources: dict[str, Path], clean: dict[str, str]) -> dict[str, list[float]]:
    """The request-id middleware with tracing off, this checkout vs the baseline's, interleaved."""
    out: dict[str, list[float]] = {}
    for _ in range(3):
        for name, source in sources.items():
            res = child_json(["--middleware"], {**clean, "PYTHONPATH": str(source)})
            out.setdefault(name, []).append(res["middleware_off_us"])
    for name, values in out.items():
        print(f"request-id middleware, tracing off, {name}: {min(values):.3f} us CPU/request", flush=True)
    return out


def summarize_all(samples: dict[str, list[dict[str, float]]], micro: list[dict[str, float]],
                  micro_mw: dict[str, list[float]], spans: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (median, min, max per system and metric) and ratios (per round), with the aims."""
    units = {"direct_p50_ms": "ms", "gateway_p50_ms": "ms", "added_p50_us": "us", "added_p99_us": "us",
             "gateway_rps": "req/s", "platform_cpu_us_per_req": "us", "errors": "count"}
    rows = [{"system": name, "metric": m, **summarize([x[m] for x in rs]), "unit": units[m]}
            for name, rs in samples.items() for m in rs[0]]

    def col(name: str, m: str) -> list[float]:
        return [x[m] for x in samples[name]]

    ratios: dict[str, Any] = {}
    for a, b in (("on", "off"), ("off", "base")):
        if b in samples:
            for m in ("platform_cpu_us_per_req", "gateway_p50_ms"):
                ratios[f"{a}/{b} {m}"] = ratio_stats(col(a, m), col(b, m))
    for m in ("in_request_us", "with_export_us", "calibration_us"):
        rows.append({"system": "span work alone", "metric": m, **summarize([x[m] for x in micro]), "unit": "us"})
    for name, values in micro_mw.items():
        rows.append({"system": name, "metric": "middleware_off_us", **summarize(values), "unit": "us"})
    if "base" in micro_mw:
        ratios["off/base middleware_off_us"] = ratio_stats(micro_mw["off"], micro_mw["base"])
    delta = [on - off for on, off in zip(col("on", "added_p50_us"), col("off", "added_p50_us"), strict=True)]
    rows.append({"system": "on-off", "metric": "added_p50_us", **summarize(delta), "unit": "us"})
    in_request = summarize([x["in_request_us"] for x in micro])["median"]
    ratios["aim"] = {"tracing on adds < 50 us at p50 (wrk, on - off)": summarize(delta)["median"] < 50,
                     "span work on the request's path < 50 us CPU": in_request < 50, "spans exported": spans > 0}
    return rows, ratios


def run(a: argparse.Namespace, tmp: Path) -> tuple[dict[str, list[dict[str, float]]], list[dict[str, float]],
                                                     dict[str, list[float]], int, list[str]]:
    """Start everything, measure round by round, stop everything."""
    rounds = a.rounds or (3 if a.quick else 5)
    seconds = a.seconds or (3 if a.quick else 6)
    clean = {k: "" for k in os.environ if k.startswith("OTEL_")}
    samples: dict[str, list[dict[str, float]]] = {}
    with running([]) as procs:
        rport = free_port()
        procs.append(Proc([sys.executable, "-m", "tests.observe.otlp_receiver", str(rport)], cpus=BACKEND_CPUS,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, log=tmp / "receiver.log"))
        receiver = f"http://127.0.0.1:{rport}"
        procs[-1].wait_http(receiver + "/count", timeout=60)
        systems = {"off": start_platform("off", tmp, procs, clean, ROOT),
                   "on": start_platform("on", tmp, procs, {**clean, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver}, ROOT)}
        if a.baseline:
            systems["base"] = start_platform("base", tmp, procs, clean, a.baseline.resolve())
        for name, s in systems.items():
            check(name, s["gateway"], s["headers"])
            wrk(s["gateway"], BODY, connections=1, seconds=2, cpus=BACKEND_CPUS, headers=s["headers"])  # warm-up
            wrk(s["direct"], BODY, connections=1, seconds=2, cpus=BACKEND_CPUS)
        for r in range(rounds):
            for name, s in systems.items():
                res = measure(s, seconds)
                samples.setdefault(name, []).append(res)
                print(f"round {r + 1}/{rounds} {name:<5} direct p50 {res['direct_p50_ms']:.3f} ms  gateway p50 "
                      f"{res['gateway_p50_ms']:.3f} ms  added p50 {res['added_p50_us']:6.0f} us  "
                      f"platform cpu {res['platform_cpu_us_per_req']:5.0f} us/req  errors {res['errors']:.0f}",
                      flush=True)
        micro = micro_spans(receiver, rounds)
        micro_mw = micro_middleware({"off": ROOT, **({"base": a.baseline.resolve()} if a.baseline else {})}, clean)
        time.sleep(1)  # the exporter's batch delay (5 s by default) may still hold spans: count what arrived
        spans = int(httpx.get(receiver + "/count", timeout=10).text)
    return samples, micro, micro_mw, spans, list(systems)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--span-cpu":
        span_cpu(int(sys.argv[2]))
        return
    if sys.argv[1:] == ["--middleware"]:
        middleware_us()
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 3 s")
    ap.add_argument("--rounds", type=int, help="rounds (default 5; quick 3)")
    ap.add_argument("--seconds", type=int, help="seconds per wrk run (default 6; quick 3)")
    ap.add_argument("--baseline", type=Path, help="another checkout to run as `base` (tracing off), e.g. main")
    a = ap.parse_args()
    require_wrk()
    stop_on_sigterm()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    load_before, started = os.getloadavg(), time.monotonic()
    samples, micro, micro_mw, spans, names = run(a, tmp)
    rows, ratios = summarize_all(samples, micro, micro_mw, spans)
    params = {
        "rounds": len(samples["off"]), "seconds_per_run": a.seconds or (3 if a.quick else 6), "connections": 1,
        "body": BODY, "spans_received": spans,
        "order": "per round: " + ", ".join(f"{n} (direct, then gateway)" for n in names),
        "pinning": f"platforms on CPU {PROXY_CPUS}; replicas, the OTLP receiver and wrk on CPU {BACKEND_CPUS}",
        "on": "OTEL_EXPORTER_OTLP_ENDPOINT=<loopback receiver>, SDK defaults (BatchSpanProcessor: 5 s delay, "
              "batches of 512), OTLP/HTTP protobuf",
        "baseline": str(a.baseline) if a.baseline else None,
        "added": "gateway minus direct p50/p99 of the same system in the same round",
        "span_work_alone": "per round, a child process runs the gateway's tracing calls for 5000 requests "
                           "(after 2000 warm-up), first with an SDK tracer that exports nothing (in_request_us), then "
                           "with the real SDK and OTLP/HTTP exporter to the receiver, flushed (with_export_us); "
                           "process CPU time (all threads) per request. calibration_us: a fixed pure-Python loop "
                           "(sum(range(100))), about 0.6 us on an idle machine of this kind",
        "middleware_off_us": "the request-id middleware as built with tracing off, around an app that answers at "
                             "once, in a child process per checkout (3 each, interleaved): best of 7 x 50,000 requests",
        "versions": versions("opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http", "uvicorn", "aiohttp"),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.monotonic() - started, 1),
    }
    out = write_results("tracing", params, rows, ratios)
    print()
    print_table(rows)
    print_ratios(ratios, ratios["aim"])
    print(f"\n{spans} spans received by the loopback OTLP receiver; wrote {out}")


if __name__ == "__main__":
    main()
