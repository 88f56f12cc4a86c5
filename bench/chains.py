"""Chains: the cost of a hop between deployed steps, and what `map` fan-out buys.

One command: `python bench/chains.py [--quick]`. It starts the Ballast platform (`ballast up`, its own
BALLAST_HOME), deploys three chains with `ballast chains deploy`, and calls each through the gateway
(`POST /chains/NAME/run`, one client, keep-alive, one request at a time):

  hops     one    a chain of one no-op step: one direct call of a deployed step (the baseline)
           deep   a chain of N no-op steps, each calling the next: N-1 hops between steps, straight to the
                  next step's replica (the default)
           deepgw the same chain deployed with --via-gateway: every hop through the gateway
           per-hop overhead = (p50 deep - p50 one) / (N-1), per round (aim: < 1 ms)
  fan-out  fan    an entry calling a step (2 replicas, 20 ms of awaited work per call) for 32 items,
                  with `map(concurrency=32)` or one after another; ratio = sequential / map time

Rounds are interleaved (one, deep, deepgw, one, ...; map, seq, ...). Results: bench/results/chains.json and a
table, medians with min-max over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    Proc,
    ballast_cli,
    free_port,
    print_ratios,
    print_table,
    running,
    stop_on_sigterm,
    summarize,
    write_results,
)

STEP = '''
class S{i}(Chainlet):
    def __init__(self, nxt=depends(S{j})):
        self.nxt = nxt

    async def run(self, x: int) -> int:
        return await self.nxt.run(x)
'''
HEAD = "from ballast.chains import Chainlet, ChainletConfig, depends, entrypoint\n\n\n"
LEAF = "class S0(Chainlet):\n    async def run(self, x: int) -> int:\n        return x\n"
FAN = textwrap.dedent('''
    import asyncio


    class Work(Chainlet):
        config = ChainletConfig(autoscaling={"min_replicas": 2, "max_replicas": 2})

        async def run(self, x: int) -> int:
            await asyncio.sleep(0.02)
            return x * 2


    @entrypoint
    class Fan(Chainlet):
        def __init__(self, work=depends(Work)):
            self.work = work

        async def run(self, n: int, mode: str) -> int:
            if mode == "map":
                return sum(await self.work.map(range(n), concurrency=32))
            return sum([await self.work.run(i) for i in range(n)])
''')


def chain_of(n: int) -> str:
    """S0 (a no-op) <- S1 <- ... <- S{n-1}, the entry."""
    text = HEAD + LEAF + "".join(STEP.format(i=i, j=i - 1) for i in range(1, n))
    return text.replace(f"\nclass S{n - 1}(", f"\n@entrypoint\nclass S{n - 1}(") if n > 1 else \
        text.replace("class S0(", "@entrypoint\nclass S0(")


def deploy(env: dict[str, str], path: Path, name: str, *extra: str) -> None:
    subprocess.run([ballast_cli(), "chains", "deploy", str(path), "--name", name, "--timeout", "300", *extra],
                   env=env, check=True, capture_output=True, text=True, timeout=600)


def latencies(client: httpx.Client, url: str, body: dict[str, Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = client.post(url, json=body)
        out.append(time.perf_counter() - t)
        r.raise_for_status()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 40 calls (about a minute)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--calls", type=int, default=None, help="calls per system per round")
    ap.add_argument("--depth", type=int, default=4, help="steps in the deep chain")
    ap.add_argument("--items", type=int, default=32, help="items fanned out")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    calls = args.calls or (40 if args.quick else 200)
    stop_on_sigterm()
    home = Path(tempfile.mkdtemp(prefix="bench-chains-"))
    port = free_port()
    env = {**os.environ, "BALLAST_HOME": str(home), "BALLAST_URL": f"http://127.0.0.1:{port}"}
    procs = [Proc([ballast_cli(), "up", "--port", str(port), "--no-isolation"], env={"BALLAST_HOME": str(home)})]
    with running(procs):
        procs[0].wait_http(f"http://127.0.0.1:{port}/api/v1/health")
        for name, text in (("one", chain_of(1)), ("deep", chain_of(args.depth)), ("fan", HEAD + FAN)):
            (home / f"{name}.py").write_text(text)
            deploy(env, home / f"{name}.py", name)
        deploy(env, home / "deep.py", "deepgw", "--via-gateway")
        key = json.loads((home / "credentials.json").read_text())["api_key"]
        rows, ratios, params = measure(port, key, rounds, calls, args.depth, args.items)
    params.update({"rounds": rounds, "calls": calls, "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()})
    print_table(rows)
    print_ratios(ratios, {"per-hop p50 < 1 ms": ratios["per_hop_ms"]["median"] < 1.0})
    print(f"results: {write_results('chains', params, rows, ratios)}")


def measure(port: int, key: str, rounds: int, calls: int, depth: int, items: int
            ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    base = f"http://127.0.0.1:{port}/chains"
    p50: dict[str, list[float]] = {"one": [], "deep": [], "deepgw": []}
    fan: dict[str, list[float]] = {"map": [], "seq": []}
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        for name in p50:
            latencies(client, f"{base}/{name}/run", {"x": 1}, 10)  # warm up
        for _ in range(rounds):
            for name in p50:
                p50[name].append(statistics.median(latencies(client, f"{base}/{name}/run", {"x": 1}, calls)))
            for mode in ("map", "seq"):
                fan[mode].append(min(latencies(client, f"{base}/fan/run", {"n": items, "mode": mode}, 3)))
    hops = depth - 1
    per_hop = [(d - o) / hops * 1000 for d, o in zip(p50["deep"], p50["one"], strict=True)]
    per_hop_gw = [(d - o) / hops * 1000 for d, o in zip(p50["deepgw"], p50["one"], strict=True)]
    rows = [{"system": system, "metric": "p50 latency", **{k: v * 1000 for k, v in summarize(vals).items()},
             "unit": "ms"} for system, vals in (("chain of 1", p50["one"]), (f"chain of {depth}", p50["deep"]),
                                                (f"chain of {depth}, via gateway", p50["deepgw"]))]
    rows.append({"system": "per hop", "metric": "p50 overhead", **summarize(per_hop), "unit": "ms"})
    rows.append({"system": "per hop, via gateway", "metric": "p50 overhead", **summarize(per_hop_gw), "unit": "ms"})
    rows += [{"system": f"fan-out {mode}", "metric": f"{items} items", **{k: v * 1000 for k, v in
              summarize(vals).items()}, "unit": "ms"} for mode, vals in fan.items()]
    speedup = [s / m for s, m in zip(fan["seq"], fan["map"], strict=True)]
    gw_over_direct = [g / d for g, d in zip(per_hop_gw, per_hop, strict=True) if d > 0]
    ratios = {"per_hop_ms": {**summarize(per_hop), "of_medians": statistics.median(per_hop)},
              "per_hop_via_gateway_ms": {**summarize(per_hop_gw), "of_medians": statistics.median(per_hop_gw)},
              "hop_gateway_over_direct": {**summarize(gw_over_direct or [float("nan")]),
                                          "of_medians": statistics.median(per_hop_gw) / statistics.median(per_hop)},
              "seq_over_map": {**summarize(speedup),
                               "of_medians": statistics.median(fan["seq"]) / statistics.median(fan["map"])}}
    return rows, ratios, {"depth": depth, "items": items, "work_s": 0.02, "work_replicas": 2}


if __name__ == "__main__":
    main()
