"""Speculative decoding: SmolLM2-135M-Instruct decode speed with n-gram lookup, self-draft and a draft model vs without.

One command: `python bench/spec.py [--quick]`. Everything runs in this process (CPU, or the GPU if any),
with the same torch threads for every system. The task copies from its prompt: "repeat this text with
one change" (a paragraph, a different one per request; see `copy_prompt`), greedy, so every system emits
the same tokens (speculation keeps greedy output identical) and the comparison is tokens per second alone.

1. Single stream: decode tokens/s of one request (from its first output token to its last), plain vs
   n-gram (k=4) vs self-draft (the first third of the layers, k=3) vs a draft model (k=3). Aim: n-gram
   >= 1.8x plain.
2. 32 concurrent requests: output tokens/s of the whole batch, plain vs n-gram and vs the draft model,
   both with the adaptive switch (on by default). Aim: never slower than plain (ratio >= 0.95 given the
   machine's noise).

The draft model: no smaller SmolLM2 ships in a package here, so `make_draft` writes one offline, a
standalone HF checkpoint directory of SmolLM2's first DRAFT_LAYERS decoder layers with its final norm and
(tied) LM head and its tokenizer, which the engine loads through its draft-model path (`draft_checkpoint`:
its own weights and KV cache, run only while speculating and caught up on the tokens it missed before it
proposes). It proposes what self-draft proposes with as many layers, so the two differ by the draft
model's own cache and its catch-up: the price of a separate draft checkpoint, measured. When it mirrored
every target forward it decoded at 0.75x plain at 32 concurrent with the switch off for 88% of steps; run
lazily, 1.00x (0.95-1.05x; quick run, 2 rounds, 1 thread, load average 6, 2 of 243 steps speculated).

Systems are interleaved in every round (A B C, A B C, ...). Results go to bench/results/spec.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors.torch import load_file, save_file

from ballast.engine import LLM, SamplingParams, resolve_checkpoint
from bench._common import print_ratios, print_table, ratio_stats, summarize, write_results

SUBJECTS = ["The committee", "The engineering team", "Our neighbours", "The city council", "The museum staff",
            "A group of students", "The hospital board", "The orchestra"]
PLACES = ["library", "bridge", "school", "park", "station", "harbour", "clinic", "theatre"]
DRAFT_LAYERS = 10  # self-draft's default: a third of SmolLM2-135M's 30 layers
SPECS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "ngram": {"method": "ngram", "num_tokens": 4},
    "self_draft": {"method": "self_draft", "num_tokens": 3, "draft_layers": DRAFT_LAYERS},
    "draft_model": {"method": "draft_model", "num_tokens": 3},  # draft_checkpoint: make_draft's directory
}


def make_draft(target: Path, out: Path, layers: int) -> Path:
    """A standalone checkpoint of `target`'s first `layers` decoder layers, final norm, LM head and tokenizer."""
    cfg = json.loads((target / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    keep = {}
    for k, v in load_file(str(target / "model.safetensors")).items():
        parts = k.split(".")
        if parts[:2] == ["model", "layers"] and int(parts[2]) >= layers:
            continue
        keep[k] = v.contiguous()
    save_file(keep, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        if (target / name).exists():
            shutil.copy(target / name, out / name)
    return out


def copy_prompt(llm: LLM, i: int) -> list[int]:
    """A text and the start of its copy with one change (varies with i): the answer copies from the prompt.

    SmolLM2-135M does not copy code when asked in a chat (it rewrites it), so the task is a completion
    that repeats a paragraph; the same shape as extraction or quoting in a larger model's answer."""
    who, place = SUBJECTS[i % len(SUBJECTS)], PLACES[(i // len(SUBJECTS) + i) % len(PLACES)]
    text = (f"{who} met on Tuesday to review the budget for the new {place}, and agreed to fund the reading "
            f"room, the garden and {i + 2} new positions before the end of the year.")
    prompt = f"Text: {text}\nThe same text, repeated word for word with Tuesday changed to Friday:\nText: {who}"
    return llm.tokenizer.encode(prompt)


def decode_rate(llm: LLM, prompt: list[int], out_len: int) -> tuple[float, int]:
    """Decode tokens/s of one request after its first token, and the tokens it produced."""
    eng = llm.engine
    eng.add_request(f"b-{time.monotonic_ns()}", prompt, SamplingParams(max_tokens=out_len, temperature=0))
    tokens, t = 0, None
    while eng.has_work():
        for out in eng.step():
            n = sum(len(c.token_ids) for c in out.outputs)
            if t is None and n:
                t = time.perf_counter()
                n -= 1  # the first token comes from the prefill
            tokens += n
    assert t is not None
    return tokens / (time.perf_counter() - t), tokens


def batch_rate(llm: LLM, prompts: list[list[int]], out_len: int) -> float:
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=out_len, temperature=0))
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def _spec_stats(llm: LLM) -> dict[str, float]:
    s = llm.engine.stats()
    return {k: round(s[k], 3) for k in ("spec_acceptance_rate", "spec_tokens_per_step", "spec_steps",
                                        "spec_skipped_steps")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few minutes: shorter outputs, 2 rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    out_len, batch_len, batch = (96, 24, 32) if args.quick else (160, 64, 32)
    torch.set_num_threads(args.threads)
    path = resolve_checkpoint("smollm2-135m-instruct")
    tmp = Path(tempfile.mkdtemp(prefix="ballast-draft-"))
    try:
        draft = make_draft(path, tmp / f"smollm2-135m-first{DRAFT_LAYERS}", DRAFT_LAYERS)
        specs = {**SPECS, "draft_model": {**(SPECS["draft_model"] or {}), "draft_checkpoint": str(draft)}}
        llms = {name: LLM(str(path), kv_cache_memory="512Mi", num_threads=args.threads, speculative=spec)
                for name, spec in specs.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the draft's weights are in memory now
    for llm in llms.values():  # warm-up: first-call allocations are nobody's decode time
        decode_rate(llm, copy_prompt(llm, 999), 8)
    single: dict[str, list[float]] = {name: [] for name in llms}
    names = list(llms)
    for r in range(rounds):
        prompt = copy_prompt(llms["plain"], r)
        counts = {}
        for name in names[r % len(names):] + names[: r % len(names)]:  # a different system first each round
            rate, counts[name] = decode_rate(llms[name], prompt, out_len)
            single[name].append(rate)
        if len(set(counts.values())) != 1:
            raise RuntimeError(f"systems emitted different token counts: {counts}")
        print(f"single round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in single.items()),
              flush=True)
    single_stats = {name: _spec_stats(llm) for name, llm in llms.items() if name != "plain"}
    conc: dict[str, list[float]] = {"plain": [], "ngram": [], "draft_model": []}
    for r in range(rounds):
        prompts = [copy_prompt(llms["plain"], 100 * r + i) for i in range(batch)]
        order = list(conc)
        for name in order[r % len(order):] + order[: r % len(order)]:
            conc[name].append(batch_rate(llms[name], prompts, batch_len))
        print(f"batch round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in conc.items()),
              flush=True)
    rows = [{"system": k, "metric": "single-stream decode tokens/s", **summarize(v), "unit": "tok/s"}
            for k, v in single.items()]
    rows += [{"system": k, "metric": f"{batch} concurrent output tokens/s", **summarize(v), "unit": "tok/s"}
             for k, v in conc.items()]
    ratios: dict[str, Any] = {
        "ngram/plain single": ratio_stats(single["ngram"], single["plain"]),
        "self_draft/plain single": ratio_stats(single["self_draft"], single["plain"]),
        "draft_model/plain single": ratio_stats(single["draft_model"], single["plain"]),
        f"ngram/plain {batch} concurrent": ratio_stats(conc["ngram"], conc["plain"]),
        f"draft_model/plain {batch} concurrent": ratio_stats(conc["draft_model"], conc["plain"]),
    }
    aim = {"ngram single >= 1.8x": ratios["ngram/plain single"]["median"] >= 1.8,
           f"ngram at {batch} concurrent never slower (>= 0.95x)":
               ratios[f"ngram/plain {batch} concurrent"]["median"] >= 0.95,
           f"draft_model at {batch} concurrent never slower (>= 0.95x)":
               ratios[f"draft_model/plain {batch} concurrent"]["median"] >= 0.95}
    ratios["aim"] = aim
    params = {"quick": args.quick, "rounds": rounds, "threads": args.threads, "out_len": out_len,
              "batch": batch, "batch_out_len": batch_len, "specs": SPECS, "draft_model":
                  f"SmolLM2-135M's first {DRAFT_LAYERS} of 30 layers + final norm + LM head, a separate checkpoint",
              "load_avg": os.getloadavg(), "spec_stats_single": single_stats,
              "spec_stats_all": {name: _spec_stats(llms[name]) for name in ("ngram", "draft_model")}}
    print_table(rows)
    print_ratios(ratios, aim)
    print("speculation, single stream:", single_stats)
    print("speculation, overall (single + concurrent):", params["spec_stats_all"])
    print("results:", write_results("spec", params, rows, ratios))


if __name__ == "__main__":
    main()
