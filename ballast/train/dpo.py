"""DPO on preference pairs with `trl` (a LoRA through `peft`; the frozen base is the reference model). TRL's
Trainer checkpoints every `checkpoint_every` steps (adapter, optimizer, RNG, trainer state) and resumes from
the last one."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ballast.engine.checkpoints import resolve_checkpoint
from ballast.train.data import preference_rows, read_jsonl
from ballast.train.spec import ADAPTER, CHECKPOINTS, TRAIN, Progress, TrainSpec


def _last(out: Path) -> Path | None:
    found = [(int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(found)[1] if found else None


def train_dpo(spec: TrainSpec, job_dir: Path) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from ballast.train.sft import load_peft

    torch.manual_seed(spec.seed)
    base = resolve_checkpoint(spec.checkpoint, spec.base_dir)
    rows = preference_rows(read_jsonl(job_dir / TRAIN))
    per_epoch = math.ceil(len(rows) / spec.batch_size)
    total = per_epoch * spec.n_epochs if spec.max_steps is None else min(spec.max_steps, per_epoch * spec.n_epochs)
    out = job_dir / CHECKPOINTS
    resume = _last(out)
    progress = Progress(job_dir, total, int(resume.name.split("-")[1]) if resume else 0)
    progress.write("start", step=progress.start_step, total_steps=total, examples=len(rows), resumed=bool(resume))
    tokens: dict[str, float] = {"n": 0, "t": time.perf_counter()}

    class Report(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                now = time.perf_counter()
                n = int(state.num_input_tokens_seen or 0)
                progress.step(state.global_step, float(logs["loss"]), n - int(tokens["n"]), now - tokens["t"], n)
                tokens.update(n=n, t=now)

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            progress.write("checkpoint", step=state.global_step,
                           path=f"{CHECKPOINTS}/checkpoint-{state.global_step}")

    config = DPOConfig(output_dir=str(out), per_device_train_batch_size=spec.batch_size,
                       num_train_epochs=spec.n_epochs, max_steps=total, learning_rate=spec.learning_rate,
                       beta=spec.beta, max_length=spec.max_length, logging_steps=1, save_steps=spec.checkpoint_every,
                       report_to=[], use_cpu=not torch.cuda.is_available(), seed=spec.seed, disable_tqdm=True,
                       include_num_input_tokens_seen=True, dataset_num_proc=None)
    trainer = DPOTrainer(model=load_peft(spec, base), args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(str(base)), callbacks=[Report()])
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    adapter = job_dir / ADAPTER
    shutil.rmtree(adapter, ignore_errors=True)
    trainer.model.save_pretrained(str(adapter))  # type: ignore[union-attr,operator]
    return {"step": trainer.state.global_step, "trained_tokens": int(trainer.state.num_input_tokens_seen or 0)}
