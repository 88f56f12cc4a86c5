"""TTFT at concurrency 1: where one request's time goes (replica over HTTP vs the engine vs a bare HF forward).

One command: `python bench/ttft.py [--quick]`. `bench/serving.py` reports Ballast's TTFT p50 at concurrency 1
against `transformers serve`; this benchmark splits that figure, for one request at a time, into:

- `replica`: `ballast serve examples/chat` over HTTP, streaming chat completion, time to the first non-empty
  content chunk (what guidellm calls TTFT), `max_completion_tokens: 1`;
- `engine`: the native engine in this process (same settings as examples/chat), the same chat prompt's
  token ids, from `add_request` to the first token (prefill + sampling + detokenization);
- `hf`: a bare transformers forward of the same token ids (SDPA, fp32) and an argmax of the last logits,
  in this process with the same torch thread count: the floor any server on this model can reach.

Each round runs the three interleaved (replica, engine, hf), on a new random prompt of about 128 tokens (no
prefix-cache hit beyond the chat template). The replica idles while this process computes, and the
reverse. Besides times, each round counts the voluntary context switches (sleeps) of all the threads of the
replica and of this process during the request: a figure that does not depend on how busy the machine is.
Results: bench/results/ttft.json (medians, min-max, per-round ratios to `hf`).

Finding (issue #14, item 4). The quick run at commit 235e662 (quiet machine, 140-token prompt) measured the
replica at 279 ms (251-303), the engine in a plain process at 175 ms (166-195), a bare HF forward at 213 ms
(190-217): the replica ran the same forward 1.6x slower. Hypotheses, one measurement each (2-core VM):
- (a) a spinning thread: no. Per-thread CPU ticks over 10 prefills: the event loop thread 3 ticks (30 ms),
  no other thread but the engine thread and one OpenMP worker used CPU; 2 s idle: 0 ticks.
- (c) a CPU limit: no. `sched_getaffinity` of the replica {0, 1} and Cpus_allowed_list 0-1, as in a shell;
  no nice, no cgroup quota set by `ballast serve`.
- (d) a different model: no. The replica's EngineArgs equal the benchmark's (dtype auto = fp32, same KV,
  same batch budget); perf (cpu-clock) shows the same MKL sgemm and flash-attention kernels in both.
- (b) the thread pools: yes, the root cause. The replica built the engine in an `asyncio.to_thread` worker
  (model init and weight loading run OpenMP regions there, so that thread got its own team: master + 1
  worker) and stepped it on the engine thread (a second team). libgomp then counts 3 managed threads on 2
  CPUs and cuts its spin-wait from 300000 iterations to 1000 ("throttled"), so the engine's OpenMP worker
  slept on a futex after every parallel region: 1110 voluntary context switches per prefill in the worker
  (11100 over 10 prefills), 8.6% of samples in the kernel's `finish_task_switch`; the plain process
  (one team) sleeps a handful of times. A micro-check (30 x linear + mul + silu): a second team alive ->
  180 sleeps per run vs 38 with one team.
Fix (ballast/engine/async_engine.py): the engine thread itself builds the engine, and every other tensor
job (LoRA registration) is sent to it with `AsyncEngine.call`: one OpenMP team per replica, libgomp's default
spin-wait, the same as a plain process and as HF. After it the worker's sleeps per prefill fell from ~1110
to ~200 even on a machine at load average 10-16.
The other side, measured under that load: libgomp's default spin-wait is what makes OpenMP slow on a CPU
that other busy processes share (the throttled 1000-iteration spin, GOMP_SPINCOUNT=1000 or
OMP_WAIT_POLICY=passive ran the micro-check in 280-330 ms vs 1525 ms with the default spin). HF and a plain
process pay the same; on a shared CPU set `engine.num_threads: 1` (no team at all) or start the replica
with OMP_WAIT_POLICY=passive.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench._common import (
    ROOT,
    Proc,
    free_port,
    print_ratios,
    print_table,
    ratio_stats,
    running,
    summarize,
    write_results,
)

MODEL_NAME = "smollm2-135m-instruct"
WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from",
         "his", "her", "it", "an", "were", "are", "which", "this", "model", "server", "token", "cache", "batch"]


def log(msg: str) -> None:
    print(f"[ttft {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sleeps(pid: int) -> int:
    """Voluntary context switches of all of `pid`'s threads so far (an OpenMP worker that sleeps between
    parallel regions shows here, however busy the machine is)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    total += int(line.split()[1])
        except OSError:  # the thread ended
            continue
    return total


def counted(pid: int, fn: Callable[[Any], float], arg: Any) -> tuple[float, int]:
    before = sleeps(pid)
    ms = fn(arg)
    return ms, sleeps(pid) - before


def replica_ttft(url: str, text: str) -> float:
    body = {"model": "chat", "messages": [{"role": "user", "content": text}], "max_completion_tokens": 1,
            "stream": True, "temperature": 0.0}
    t = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                return (time.perf_counter() - t) * 1e3
    raise RuntimeError("no content chunk in the replica's stream")


def in_process(threads: int) -> tuple[Callable[[str], list[int]], Callable[[list[int]], float],
                                      Callable[[list[int]], float]]:
    """The tokenizer, the engine's TTFT and a bare HF prefill + argmax, all in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ballast.engine import LLM, SamplingParams, resolve_checkpoint

    ckpt = resolve_checkpoint(MODEL_NAME)
    llm = LLM(str(ckpt), max_model_len=2048, max_num_seqs=32, max_num_batched_tokens=1024,
              kv_cache_memory="512Mi", num_threads=threads)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    torch.set_num_threads(threads)
    params = SamplingParams(max_tokens=1, temperature=0.0, repetition_penalty=1.05)  # examples/chat's defaults

    def ids(text: str) -> list[int]:
        chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=False)
        return list(tok(chat, add_special_tokens=False).input_ids)

    def engine(prompt: list[int]) -> float:
        t = time.perf_counter()
        llm.generate([prompt], params)
        return (time.perf_counter() - t) * 1e3

    def bare(prompt: list[int]) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            hf(torch.tensor([prompt])).logits[0, -1].argmax().item()
        return (time.perf_counter() - t) * 1e3

    return ids, engine, bare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="7 rounds (default 15)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--words", type=int, default=110, help="prompt words (110: about 128 tokens with the template)")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    rounds = args.rounds or (7 if args.quick else 15)
    threads = max(1, len(os.sched_getaffinity(0)))  # what the replica's engine uses (num_threads unset)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [shutil.which("ballast") or "ballast", "serve", str(ROOT / "examples" / "chat"), "--port", str(port),
           "--host", "127.0.0.1"]
    with running([Proc(cmd, cwd=ROOT)]) as procs:
        ids, engine, bare = in_process(threads)
        procs[0].wait_http(f"{url}/health/ready", timeout=300)
        rng = random.Random(args.seed)
        texts = [" ".join(rng.choice(WORDS) for _ in range(args.words)) for _ in range(rounds + 2)]
        for text in texts[:2]:  # warm-up, unmeasured (first requests at a new size are slower)
            replica_ttft(url, text), engine(ids(text)), bare(ids(text))
        res: dict[str, list[float]] = {"replica": [], "engine": [], "hf": []}
        slept: dict[str, list[float]] = {k: [] for k in res}
        me, pid = os.getpid(), procs[0].proc.pid
        for i, text in enumerate(texts[2:]):
            prompt = ids(text)
            runs = {"replica": (pid, partial(replica_ttft, url), text), "engine": (me, engine, prompt),
                    "hf": (me, bare, prompt)}
            for name, (who, fn, arg) in runs.items():
                ms, n = counted(who, fn, arg)
                res[name].append(ms)
                slept[name].append(n)
            log(f"round {i + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.0f} ms ({slept[k][-1]} sleeps)"
                                                         for k, v in res.items()))
    rows = [{"system": k, "metric": "ttft_c1", **summarize(v), "unit": "ms"} for k, v in res.items()]
    rows += [{"system": k, "metric": "voluntary context switches per request", **summarize(v), "unit": "count"}
             for k, v in slept.items()]
    ratios = {"replica/hf": ratio_stats(res["replica"], res["hf"]), "engine/hf": ratio_stats(res["engine"], res["hf"]),
              "replica/engine": ratio_stats(res["replica"], res["engine"])}
    params = {"quick": args.quick, "rounds": rounds, "prompt_tokens": len(ids(texts[0])), "threads": threads,
              "load_avg": os.getloadavg(),
              "replica": "ballast serve examples/chat, streaming, first non-empty content chunk",
              "engine": "in-process LLM, examples/chat settings, repetition_penalty 1.05, max_tokens 1",
              "hf": "in-process AutoModelForCausalLM fp32 sdpa, one forward + argmax"}
    path = write_results("ttft", params, rows, ratios)
    print_table(rows)
    print_ratios(ratios, {"replica at or below the bare HF forward": ratios["replica/hf"]["of_medians"] <= 1.0})
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
