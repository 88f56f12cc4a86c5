"""The post-training loop end to end (issue #17): a real `ballast up`, real replica processes serving the tiny
checkpoint on the native engine, a real fine-tuning worker, the real SQLite store.

Capture with redaction → feedback corrections → the dataset → a supervised LoRA job on `dataset:NAME` gated on
that dataset → the adapter (greedy output equal to HF + peft) evaluated on the held-out split, canaried, promoted
→ the deployment answers with it. The data is built so the gate's verdict is known: every prompt is one pattern
and (nearly) every correction the same short answer, which a few high-learning-rate steps teach the adapter, while
the random base model never writes it (`contains`, margin 0.5); a margin no adapter can meet shows the rejection
path. Capture off writes nothing (a marker test), and
deleting a record or the dataset removes the fine-tuning job's copies too."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import write_package
from tests.control.platform import Platform, kill_leftovers
from tests.train.test_finetune_e2e import PROMPT, _client, _events, _wait_status, _worker_pids

pytest.importorskip("peft")
pytest.importorskip("ballast.engine", reason="the native engine is not built")

SECRET = "tok-{:08x}"
REDACT = r"tok-[0-9a-f]{8}"
ANSWER = "Blue."
N = 20  # captured requests; the gate's held-out split (0.2, seed 0) is 4 of them
UNCORRECTED = 2  # train-split records left with the model's own answer: "corrections on some of them"
LOOP: dict[str, Any] = {}  # what the loop test leaves to the deletion test


@pytest.fixture(scope="module")
def plat(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    root = tmp_path_factory.mktemp("loop")
    engine = f"engine: {{kind: native, checkpoint: {tiny_checkpoint}, max_model_len: 256, kv_cache_memory: 16Mi}}"
    write_package(root / "chat", f"""
        name: chat
        {engine}
        autoscaling: {{min_replicas: 1, max_replicas: 1}}
        capture: {{dataset: sky, sample_rate: 1, redact: ['{REDACT}'], retention_days: 7}}
        """)
    write_package(root / "quiet", f"name: quiet\n{engine}\nautoscaling: {{min_replicas: 1, max_replicas: 1}}\n")
    p = Platform(root / "home", retire_grace_s=300).start()
    try:
        for name in ("chat", "quiet"):
            p.api("POST", "/deployments", expect=201, json={"path": str(root / name)})
        for name in ("chat", "quiet"):
            p.wait_serving(name, 1, timeout=180)
        yield p
    finally:
        pids = p.replica_pids() if p.proc and p.proc.poll() is None else []
        p.stop()
        kill_leftovers(pids + _worker_pids(p))


def _chat(p: Platform, model: str, text: str, max_tokens: int = 8) -> httpx.Response:
    r = httpx.post(p.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {p.key}"}, timeout=120,
                   json={"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                         "temperature": 0})
    assert r.status_code == 200, r.text
    return r


def _feedback(p: Platform, request_id: str, **body: Any) -> dict[str, Any]:
    r = httpx.post(p.url + "/v1/feedback", headers={"Authorization": f"Bearer {p.key}"}, timeout=30,
                   json={"request_id": request_id, **body})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _files_containing(home: Path, needle: str) -> list[str]:
    """Every file under the platform's home whose bytes contain `needle` (store, logs, job dirs, packages)."""
    return [str(f) for f in home.rglob("*") if f.is_file() and needle.encode() in f.read_bytes()]


def _prompt(i: int) -> str:
    return f"Ticket {i}: my key is {SECRET.format(0xA0000000 + i)}. What color is the sky?" if i % 2 == 0 \
        else f"Ticket {i}: what color is the sky?"


def _dep_events(p: Platform, kind: str) -> list[dict[str, Any]]:
    return [e for e in p.api("GET", "/events", params={"deployment": "chat", "limit": 500})["data"]
            if e["kind"] == kind]


def test_capture_off_writes_nothing(plat: Platform) -> None:
    marker = "zebra-marker-5521"
    _chat(plat, "quiet", f"Remember {marker} for me.")
    assert plat.api("GET", "/datasets")["data"] == []
    assert _files_containing(plat.home, marker) == []


def test_the_loop_capture_feedback_finetune_gate_canary(plat: Platform, tiny_checkpoint: Path) -> None:
    from ballast.engine import LLM, SamplingParams

    rids = [_chat(plat, "chat", _prompt(i)).headers["x-request-id"] for i in range(N)]
    [sky] = plat.api("GET", "/datasets")["data"]
    assert sky["name"] == "sky" and sky["examples"] == N
    rows = plat.api("GET", "/datasets/sky", params={"limit": 100})["data"]
    assert [r["request_id"] for r in rows] == rids  # captured in order, one row each
    assert rows[0]["messages"][0]["content"] == "Ticket 0: my key is [REDACTED]. What color is the sky?"
    held = set(_held_out(N))
    # A correction is redacted too; a second feedback replaces the first.
    fb = _feedback(plat, rids[0], rating=-1, correction=f"Blue. Your key {SECRET.format(0xA0000000)} is safe.")
    assert fb["correction"]["content"] == "Blue. Your key [REDACTED] is safe."
    uncorrected = [i for i in range(N) if i not in held][-UNCORRECTED:]
    for i in range(N):
        if i not in uncorrected:
            _feedback(plat, rids[i], rating=1, correction=ANSWER)
    assert plat.api("GET", "/datasets")["data"][0]["corrected"] == N - UNCORRECTED
    for i in range(0, N, 2):
        assert _files_containing(plat.home, SECRET.format(0xA0000000 + i)) == [], i  # redacted before any write
    exported = plat.api("GET", "/datasets/sky/export")["train"]
    assert [e["messages"][-1]["content"] == ANSWER for e in exported].count(True) == N - UNCORRECTED

    job = _client(plat).fine_tuning.jobs.create(
        model="chat", training_file="dataset:sky", suffix="sky", seed=1,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 50, "batch_size": 4, "learning_rate_multiplier": 50}}},
        extra_body={"ballast": {"max_steps": 40, "checkpoint_every": 20, "held_out": 0, "gate": {
            "dataset": "sky", "metric": "contains", "margin": 0.5, "canary_percent": 50, "hold_s": 3}}})
    d = plat.home / "finetune" / job.id
    trained = [json.loads(x) for x in (d / "train.jsonl").read_text().splitlines()]
    assert len(trained) == N - len(held)  # the gate's held-out examples are never trained on
    done = _wait_status(plat, job.id, "succeeded", timeout=600)
    adapter = (done.model_extra or {})["ballast"]["adapter_name"]

    # The engine serves the job's adapter as HF + peft computes it.
    llm = LLM(str(tiny_checkpoint), adapters={adapter: str(d / "adapter")})
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert llm.generate([PROMPT], greedy, lora=adapter)[0].outputs[0].token_ids == \
        _peft_greedy(tiny_checkpoint, d / "adapter", 8)

    # The gate: evaluated on the held-out split, a canary, promoted after the hold; every step names the job.
    [passed] = plat.wait("the gate's verdict", lambda: _dep_events(plat, "gate_passed") or
                         _dep_events(plat, "gate_rejected"), timeout=600, every=0.5)
    assert passed["kind"] == "gate_passed", passed
    assert passed["data"]["job_id"] == job.id
    gate_eval = [e for e in _dep_events(plat, "eval") if e["data"].get("job_id") == job.id]
    assert gate_eval, _dep_events(plat, "eval")
    [canary] = _dep_events(plat, "canary")
    assert canary["data"]["percent"] == 50 and canary["actor"] == f"adapter-gate job {job.id}"
    for _ in range(8):  # traffic in the hold: the guard compares both versions' errors and latency
        _chat(plat, "chat", _prompt(100))
    [promoted] = plat.wait("canary promoted", lambda: _dep_events(plat, "canary_promoted"), timeout=180, every=0.5)
    assert promoted["data"]["job_id"] == job.id
    messages = [e.message for e in _events(plat, job.id)]
    assert any(m.startswith("Gate canary: contains") for m in messages), messages

    # The deployment's name is now answered by the adapter: the correction, for a prompt of the same pattern.
    answer = _chat(plat, "chat", _prompt(101), max_tokens=16).json()["choices"][0]["message"]["content"]
    assert ANSWER in answer, answer

    LOOP.update(rids=rids, job=job.id, victim=next(i for i in range(N) if i not in held and i not in uncorrected
                                                      and i != 0))


def test_a_gated_job_that_cannot_win_is_rejected(plat: Platform) -> None:
    """Production is now the adapter that learned the answer (contains = 1 on the held-out split), so no candidate
    can beat it by the margin of 1: the gate rejects honestly; the adapter stays registered (a version with its
    scores) and production is unchanged. A margin the gate could never apply is refused when the job is made."""
    before = {e["name"]: e for e in plat.show("chat")["environments"]}["production"]["version"]
    r = httpx.post(plat.url + "/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {plat.key}"}, timeout=30,
                   json={"model": "chat", "training_file": "dataset:sky",
                         "ballast": {"gate": {"dataset": "sky", "margin": 1.5}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "ballast.gate.margin", r.text
    job = _client(plat).fine_tuning.jobs.create(
        model="chat", training_file="dataset:sky", suffix="lose", seed=2,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
        extra_body={"ballast": {"max_steps": 2, "held_out": 0, "gate": {"dataset": "sky", "metric": "contains",
                                                                         "margin": 1.0, "hold_s": 1}}})
    _wait_status(plat, job.id, "succeeded", timeout=600)
    [rejected] = plat.wait("gate_rejected", lambda: [e for e in _dep_events(plat, "gate_rejected")
                                                     if e["data"].get("job_id") == job.id], timeout=600, every=0.5)
    assert rejected["data"]["candidate_version"] > before
    assert any(m.startswith("Gate rejected: contains") for m in (e.message for e in _events(plat, job.id)))
    prod = {e["name"]: e for e in plat.show("chat")["environments"]}["production"]
    assert prod["version"] == before and prod["canary"] is None
    assert not [e for e in _dep_events(plat, "canary") if e["actor"].endswith(job.id)]


def test_deleting_data_removes_every_copy(plat: Platform) -> None:
    """One record: its line leaves the job's copy; the dataset: every row and the jobs' copies (both jobs)."""
    rids, victim, d = LOOP["rids"], LOOP["victim"], plat.home / "finetune" / LOOP["job"]
    before = (d / "train.jsonl").read_text().count("\n")
    plat.cli("datasets", "delete", "sky", "--request-id", rids[victim])
    assert (d / "train.jsonl").read_text().count("\n") == before - 1
    assert f"Ticket {victim}:" not in (d / "train.jsonl").read_text()
    plat.cli("datasets", "delete", "sky")
    plat.api("GET", "/datasets/sky", expect=404)
    assert not (d / "train.jsonl").exists()
    assert _files_containing(plat.home / "finetune", "What color is the sky?") == []
    assert not list((plat.home / "finetune").glob("*/train.jsonl"))
    assert "Training data deleted with dataset sky" in [e.message for e in _events(plat, LOOP["job"])]


def _peft_greedy(base: Path, adapter: Path, n: int) -> list[int]:
    """HF + peft's greedy tokens, argmax step by step: an end-of-sequence token counts like any other (the adapter
    learned to stop; `generate`'s min_new_tokens would mask it, while the engine's ignore_eos keeps it)."""
    import peft
    import transformers

    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter)).eval()
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(PROMPT):]


def _held_out(n: int) -> list[int]:
    """The gate's held-out indexes among `n` examples in capture order (Datasets.split with 0.2, seed 0)."""
    order = list(range(n))
    random.Random(0).shuffle(order)
    return order[:round(n * 0.2)]
