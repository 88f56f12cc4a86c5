"""The interactive/batch mix of bench/async_batch.py: interactive TTFT while a batch runs vs alone, and the batch's
throughput in that mix as a share of the batch alone (SmolLM2-135M-Instruct, native engine, one replica).

Each round runs three conditions back to back on the same platform and replica:
  interactive  sequential streamed chat requests (greedy, `max_tokens` few) with a short pause between them
  batch        one OpenAI batch of `lines` chat lines (ignore_eos, fixed length) from create to `completed`
  mix          the same batch, with the interactive loop running until the batch completes
The replica's engine takes interactive requests first (priority 0) and batch lines last (4); the dispatcher sends
batch lines only while the replica has spare capacity (`concurrency_target`).
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from pathlib import Path

import httpx

from bench._common import Proc, ballast_cli, free_port

VOCABULARY = ("parcel refund label courier warehouse invoice customs address weight tracking window delivery "
              "return policy carrier express pallet signature depot route driver schedule insurance claim damage")
WORDS = VOCABULARY.split()
PACKAGE = """name: mix-chat
description: SmolLM2-135M-Instruct for the mix in bench/async_batch.py.
engine:
  kind: native
  checkpoint: smollm2-135m-instruct
  served_model_name: mix-chat
  max_model_len: 1024
  max_num_seqs: 8
  max_num_batched_tokens: 512
  kv_cache_memory: 256Mi
  num_threads: 1
runtime:
  predict_concurrency: 16
  max_queue: 64
  request_timeout_s: 600
autoscaling:
  min_replicas: 1
  max_replicas: 1
  concurrency_target: 8
"""


def _prompt(rng: random.Random, n: int) -> str:
    return "Summarize this shipping note: " + " ".join(rng.choice(WORDS) for _ in range(n))


def start(tmp: Path, procs: list[Proc]) -> tuple[str, str]:
    from ballast.engine.checkpoints import resolve_checkpoint

    resolve_checkpoint("smollm2-135m-instruct")  # import the weights before the replica starts
    home, pkg = tmp / "mix-home", tmp / "mix-pkg"
    home.mkdir()
    pkg.mkdir()
    (pkg / "ballast.yaml").write_text(PACKAGE)
    port = free_port()
    procs.append(Proc([ballast_cli(), "up", "--port", str(port), "--no-isolation"], env={"BALLAST_HOME": str(home)},
                      log=tmp / "mix.log"))
    url = f"http://127.0.0.1:{port}"
    procs[-1].wait_http(url + "/api/v1/health", timeout=120)
    key = json.loads((home / "credentials.json").read_text())["api_key"]
    with httpx.Client(base_url=url + "/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60) as api:
        api.post("/deployments", json={"path": str(pkg), "name": "mix-chat"}).raise_for_status()
        deadline = time.monotonic() + 300
        while not any(r["state"] == "ready" for r in api.get("/deployments/mix-chat").json()["replicas"]):
            if time.monotonic() > deadline:
                raise RuntimeError(f"mix-chat did not become ready; see {tmp / 'mix.log'}")
            time.sleep(0.5)
    return url, key


def upload_batch(url: str, key: str, lines: int, max_tokens: int) -> str:
    rng = random.Random(7)
    body = "\n".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "mix-chat", "messages": [{"role": "user", "content": _prompt(rng, 30)}], "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True}}) for i in range(lines))
    r = httpx.post(url + "/v1/files", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                   files={"file": ("mix.jsonl", body.encode())}, data={"purpose": "batch"})
    r.raise_for_status()
    return str(r.json()["id"])


def run_batch(url: str, key: str, file_id: str) -> float:
    """Seconds from create to `completed`."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        t0 = time.monotonic()
        bid = c.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                          "completion_window": "24h"}).json()["id"]
        for _ in range(60_000):  # bounded: 600 s at most
            st = c.get(f"/v1/batches/{bid}").json()
            if st["status"] == "completed":
                if st["request_counts"]["failed"]:
                    raise RuntimeError(f"batch lines failed: {st['request_counts']}")
                return time.monotonic() - t0
            if st["status"] in ("failed", "expired", "cancelled"):
                raise RuntimeError(f"batch ended {st['status']}: {st}")
            time.sleep(0.05)
            if time.monotonic() - t0 > 600:
                break
    raise RuntimeError("the batch did not complete within 600 s")


def ttft_ms(c: httpx.Client, rng: random.Random) -> float:
    body = {"model": "mix-chat", "messages": [{"role": "user", "content": _prompt(rng, 20)}], "max_tokens": 4,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        ttft = None
        for line in r.iter_lines():  # read to the end: the request is finished before the next one starts
            if ttft is None and line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"]
                if delta and delta[0].get("delta", {}).get("content"):
                    ttft = (time.perf_counter() - t0) * 1000
        if ttft is not None:
            return ttft
    raise RuntimeError("a streamed answer had no content")


def interactive(url: str, key: str, seed: int, n: int, pause_s: float, until: threading.Event | None = None) -> \
        list[float]:
    """TTFTs (ms) of sequential requests: `n` of them, or (with `until`) as many as run before it is set."""
    rng = random.Random(seed)
    out: list[float] = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
        for _ in range(n if until is None else 10_000):
            if until is not None and until.is_set():
                break
            out.append(ttft_ms(c, rng))
            time.sleep(pause_s)
    return out


def mix(url: str, key: str, file_id: str, seed: int, pause_s: float) -> tuple[list[float], float]:
    """(interactive TTFTs while the batch ran, the batch's seconds)."""
    done = threading.Event()
    took: list[float] = []

    def batch() -> None:
        try:
            took.append(run_batch(url, key, file_id))
        finally:
            done.set()

    t = threading.Thread(target=batch)
    t.start()
    time.sleep(0.5)  # the batch's first lines are running
    ttfts = interactive(url, key, seed, 0, pause_s, until=done)
    t.join()
    if not took:
        raise RuntimeError("the batch in the mix failed")
    return ttfts, took[0]


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]
