"""Fine-tuning jobs end to end: a real `ballast up`, real worker processes (`python -m ballast.train`), the tiny
checkpoint, the openai SDK's `fine_tuning.jobs` unchanged. A supervised job's adapter is loaded by the native
engine with greedy output equal to HF + peft; a DPO job trains on preference pairs; a SIGKILLed worker resumes
from its checkpoint with its step count continuing; a platform killed with -9 re-adopts the running worker;
cancel stops the worker; bad requests are 400s naming what is wrong."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from tests.conftest import write_package
from tests.control.platform import Platform, kill_leftovers

pytest.importorskip("peft")
PROMPT = list(range(5, 30))


def _examples(n: int) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "system", "content": "Answer in one word."},
                          {"role": "user", "content": f"What comes after {i}?"},
                          {"role": "assistant", "content": f"The number {i + 1} comes next."}]} for i in range(n)]


def _jsonl(rows: list[Any]) -> io.BytesIO:
    return io.BytesIO(b"".join(json.dumps(r).encode() + b"\n" for r in rows))


@pytest.fixture(scope="module")
def plat(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    root = tmp_path_factory.mktemp("finetune")
    # Scaled to zero: the jobs train on the production version's checkpoint; no replica needs to run.
    chat = write_package(root / "chat", f"""
        name: chat
        engine: {{kind: native, checkpoint: {tiny_checkpoint}, max_model_len: 256, kv_cache_memory: 32Mi}}
        autoscaling: {{min_replicas: 0, max_replicas: 1}}
        """)
    plain = write_package(root / "plain", "name: plain\nautoscaling: {min_replicas: 0, max_replicas: 1}\n",
                          "class Model:\n    def predict(self, x):\n        return x\n")
    p = Platform(root / "home").start()
    try:
        for pkg in (chat, plain):
            p.api("POST", "/deployments", expect=201, json={"path": str(pkg)})
        yield p
    finally:
        p.stop()
        kill_leftovers(_worker_pids(p))


def _worker_pids(p: Platform) -> list[int]:
    out = []
    for f in (p.home / "finetune").glob("*/worker.log"):
        pid = _pid_of(f.parent)
        if pid:
            out.append(pid)
    return out


def _pid_of(d: Path) -> int | None:
    for stat in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(d).encode() in stat.read_bytes() and b"ballast.train" in stat.read_bytes():
                return int(stat.parent.name)
        except OSError:
            continue
    return None


def _client(p: Platform, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=p.url + "/v1", api_key=key or p.key, max_retries=0, timeout=60)


def _upload(p: Platform, rows: list[Any], key: str | None = None) -> str:
    return _client(p, key).files.create(file=("train.jsonl", _jsonl(rows)), purpose="fine-tune").id


def _create(p: Platform, file_id: str, *, max_steps: int, checkpoint_every: int = 5, method: str = "supervised",
            gate: dict[str, Any] | None = None, validation: str | None = None, **hyper: Any) -> Any:
    ballast: dict[str, Any] = {"max_steps": max_steps, "checkpoint_every": checkpoint_every}
    if gate:
        ballast["gate"] = gate
    return _client(p).fine_tuning.jobs.create(
        model="chat", training_file=file_id, validation_file=validation, suffix="t", seed=3,
        method={"type": method, method: {"hyperparameters": {"n_epochs": 50, "batch_size": 2,
                                                               "learning_rate_multiplier": 50, **hyper}}},
        extra_body={"ballast": ballast})


def _wait_status(p: Platform, job_id: str, status: str, timeout: float = 300) -> Any:
    c = _client(p)

    def done() -> Any:
        j = c.fine_tuning.jobs.retrieve(job_id)
        assert j.status not in {"failed", "cancelled"} - {status}, (j.error, _log(p, job_id))
        return j if j.status == status else None

    return p.wait(f"{job_id} {status}", done, timeout=timeout, every=0.2)


def _log(p: Platform, job_id: str) -> str:
    f = p.home / "finetune" / job_id / "worker.log"
    return f.read_text()[-3000:] if f.exists() else ""


def _events(p: Platform, job_id: str) -> list[Any]:
    return list(reversed(_client(p).fine_tuning.jobs.list_events(job_id, limit=1000).data))


def _step_of(p: Platform, job_id: str) -> int:
    j = _client(p).fine_tuning.jobs.retrieve(job_id)
    return int((j.model_extra or {})["ballast"]["step"])


def _peft_greedy(base: Path, adapter: Path, n: int) -> list[int]:
    import peft
    import transformers

    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter)).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def test_sdk_supervised_job_adapter_served_by_the_engine(plat: Platform, tiny_checkpoint: Path) -> None:
    from ballast.engine import LLM, SamplingParams

    c = _client(plat)
    fid = _upload(plat, _examples(8))
    job = _create(plat, fid, max_steps=6, checkpoint_every=2, validation=_upload(plat, _examples(3)))
    assert job.object == "fine_tuning.job" and job.status in ("queued", "running") and job.model == "chat"
    assert job.method.type == "supervised" and job.seed == 3
    done = _wait_status(plat, job.id, "succeeded")
    adapter = (done.model_extra or {})["ballast"]["adapter_name"]
    assert done.fine_tuned_model == f"chat/{adapter}" and done.trained_tokens and done.trained_tokens > 0
    assert job.id in [j.id for j in c.fine_tuning.jobs.list(limit=100).data]
    messages = [e.message for e in _events(plat, job.id)]
    assert any(m.startswith("Step 6/6") for m in messages), messages
    assert any(m.startswith("Validation loss=") and m.endswith("on 3 examples") for m in messages), messages
    metrics = [e for e in _events(plat, job.id) if e.type == "metrics" and "tokens_per_s" in e.data]
    assert [e.data["step"] for e in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(e.data["tokens_per_s"] and e.data["eta_s"] is not None for e in metrics)
    ckpts = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert sorted(k.step_number for k in ckpts) == [2, 4]
    d = plat.home / "finetune" / job.id
    assert oct(d.stat().st_mode & 0o777) == "0o700"
    for f in ("train.jsonl", "config.json", "progress.jsonl", "worker.log", "adapter/adapter_model.safetensors"):
        assert oct((d / f).stat().st_mode & 0o777) == "0o600", f
    adapter_dir = d / "adapter"
    assert (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "adapter_model.safetensors").exists()
    llm = LLM(str(tiny_checkpoint), adapters={adapter: str(adapter_dir)})
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    got = llm.generate([PROMPT], greedy, lora=adapter)[0].outputs[0].token_ids
    assert got == _peft_greedy(tiny_checkpoint, adapter_dir, 8)
    assert got != llm.generate([PROMPT], greedy)[0].outputs[0].token_ids, "the adapter learned nothing"


def test_cli_follows_a_job_on_a_dataset(plat: Platform) -> None:
    text = "".join(json.dumps(e) + "\n" for e in _examples(10))
    assert plat.api("POST", "/datasets/faq/import", expect=201, json={"jsonl": text})["imported"] == 10
    out = plat.cli("fine-tune", "create", "--model", "chat", "--dataset", "faq", "--epochs", "1", "--batch-size",
                   "3", "--suffix", "faq", "--follow", timeout=300).stdout
    job_id = out.split()[0]
    assert job_id.startswith("ftjob-") and "succeeded" in out and "fine_tuned_model=chat/faq-" in out, out
    assert "The job has successfully completed" in out
    rows = [json.loads(x) for x in (plat.home / "finetune" / job_id / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 9  # the held-out tenth stays out of training
    assert "3/3" in plat.cli("fine-tune", "show", job_id).stdout  # ceil(9 / 3) steps, one epoch
    assert job_id in plat.cli("fine-tune", "list").stdout
    assert "Job queued" in plat.cli("fine-tune", "events", job_id).stdout


def test_dpo_job_on_preference_pairs(plat: Platform) -> None:
    pairs = [{"input": {"messages": [{"role": "user", "content": f"Greet person {i}."}]},
              "preferred_output": [{"role": "assistant", "content": f"Hello, person {i}!"}],
              "non_preferred_output": [{"role": "assistant", "content": "Go away."}]} for i in range(4)]
    job = _create(plat, _upload(plat, pairs), max_steps=2, checkpoint_every=1, method="dpo", beta=0.2,
                  n_epochs=1)
    done = _wait_status(plat, job.id, "succeeded")
    assert done.method.type == "dpo" and done.method.dpo.hyperparameters.beta == 0.2
    adapter = plat.home / "finetune" / job.id / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert [e.data["step"] for e in _events(plat, job.id) if e.type == "metrics"] == [1, 2]


def test_killed_worker_resumes_from_its_checkpoint(plat: Platform) -> None:
    job = _create(plat, _upload(plat, _examples(8)), max_steps=150, checkpoint_every=5)
    plat.wait("a checkpoint and more steps", lambda: _step_of(plat, job.id) >= 7, timeout=300, every=0.05)
    pid = (_client(plat).fine_tuning.jobs.retrieve(job.id).model_extra or {})["ballast"]["pid"]
    os.kill(pid, signal.SIGKILL)
    done = _wait_status(plat, job.id, "succeeded", timeout=600)
    extra = (done.model_extra or {})["ballast"]
    assert extra["attempts"] == 2 and extra["step"] == 150
    events = _events(plat, job.id)
    resumed = [e.message for e in events if e.message.startswith("Worker resumed at step")]
    assert len(resumed) == 1, [e.message for e in events]
    at = int(resumed[0].split()[4])
    assert at >= 5 and at % 5 == 0
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    cut = len(steps) - 1 - steps[::-1].index(at + 1)  # where the second worker began
    assert cut >= at and steps[:cut] == list(range(1, cut + 1))  # the first worker, killed at or after step `at`
    assert steps[cut:] == list(range(at + 1, 151))  # the second continued from the checkpoint, not from step 1


def test_cancel_stops_the_worker(plat: Platform) -> None:
    c = _client(plat)
    job = _create(plat, _upload(plat, _examples(8)), max_steps=100_000)
    plat.wait("running", lambda: _step_of(plat, job.id) >= 1, timeout=300)
    pid = (c.fine_tuning.jobs.retrieve(job.id).model_extra or {})["ballast"]["pid"]
    assert Path(f"/proc/{pid}").exists()
    assert c.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    plat.wait("the worker gone", lambda: not Path(f"/proc/{pid}").exists(), timeout=60)
    assert c.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.jobs.cancel(job.id)


def _bad(p: Platform, body: dict[str, Any], key: str | None = None, status: int = 400) -> dict[str, Any]:
    r = httpx.post(p.url + "/v1/fine_tuning/jobs", json=body, timeout=30,
                   headers={"Authorization": f"Bearer {key or p.key}"})
    assert r.status_code == status, r.text
    assert r.headers.get("x-request-id")
    return dict(r.json()["error"])


def test_bad_requests_are_400s(plat: Platform) -> None:
    good = _upload(plat, _examples(2))
    rows = [*_examples(1), {"messages": [{"role": "user", "content": "no answer"}]}]
    bad_file = _upload(plat, rows)
    e = _bad(plat, {"model": "chat", "training_file": bad_file})
    assert e["param"] == "training_file" and "line 2" in e["message"] and "assistant" in e["message"]
    assert _bad(plat, {"model": "nope", "training_file": good})["param"] == "model"
    assert _bad(plat, {"model": "plain", "training_file": good})["param"] == "model"  # not an LLM
    assert _bad(plat, {"model": str(plat.home), "training_file": good})["param"] == "model"  # paths are refused
    e = _bad(plat, {"model": "chat", "training_file": good, "hyperparameters": {"n_epochs": 0}})
    assert e["param"] == "hyperparameters.n_epochs"
    e = _bad(plat, {"model": "chat", "training_file": good, "hyperparameters": {"lr": 1}})
    assert e["param"] == "hyperparameters.lr"
    e = _bad(plat, {"model": "chat", "training_file": good, "method": {"type": "dpo", "dpo": {
        "hyperparameters": {"beta": -1}}}})
    assert e["param"] == "method.dpo.hyperparameters.beta"
    e = _bad(plat, {"model": "chat", "training_file": good, "method": {"type": "dpo"}})  # chat rows, not pairs
    assert "line 1" in e["message"]
    assert _bad(plat, {"model": "chat", "training_file": "file-nope"}, status=404)["code"] == "not_found"
    assert "no examples" in _bad(plat, {"model": "chat", "training_file": "dataset:none"})["message"]
    inference = plat.api("POST", "/keys", expect=201, json={"scopes": ["inference"]})["key"]
    assert _bad(plat, {"model": "chat", "training_file": good}, inference, 403)["code"] == "insufficient_scope"
    tuner = plat.api("POST", "/keys", expect=201, json={"scopes": ["fine_tune"]})["key"]
    assert _bad(plat, {"model": "chat", "training_file": good}, tuner, 404)["param"] == "file_id"  # not its file
    r = httpx.get(plat.url + "/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {tuner}"}, timeout=30)
    assert r.status_code == 200 and r.json()["data"] == []  # another key's jobs are not listed
    assert not list((plat.home / "finetune").glob("*/result.json.tmp"))


def test_platform_kill_9_mid_job_readopts_the_worker(plat: Platform) -> None:
    job = _create(plat, _upload(plat, _examples(16)), max_steps=300, checkpoint_every=100)  # 50 epochs of 8 steps
    plat.wait("running", lambda: _step_of(plat, job.id) >= 2, timeout=300, every=0.05)
    pid = (_client(plat).fine_tuning.jobs.retrieve(job.id).model_extra or {})["ballast"]["pid"]
    plat.stop(signal.SIGKILL)
    time.sleep(0.3)
    assert Path(f"/proc/{pid}").exists(), "the worker died with the platform"
    Platform.start(plat)
    done = _wait_status(plat, job.id, "succeeded", timeout=600)
    assert (done.model_extra or {})["ballast"]["attempts"] == 1  # the same worker finished it: no resume
    assert f"Re-adopted worker pid {pid}" in [e.message for e in _events(plat, job.id)]
    steps = [e.data["step"] for e in _events(plat, job.id) if e.type == "metrics"]
    assert steps == list(range(1, 301))  # every step once, across the restart
