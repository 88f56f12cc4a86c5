"""Supervised LoRA training with `peft`: a plain loop (no Trainer), so a checkpoint holds exactly what a resume
needs (adapter, optimizer, RNG, step, tokens) and the step count continues after a restart."""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ballast.engine.checkpoints import resolve_checkpoint
from ballast.engine.tokenizer import Tokenizer
from ballast.train.data import IGNORE, read_jsonl, supervised
from ballast.train.spec import ADAPTER, CHECKPOINTS, TRAIN, VALIDATION, Progress, TrainSpec

STATE = "state.pt"


def load_peft(spec: TrainSpec, base: Path) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=0.0,  # type: ignore[arg-type]
                     target_modules=list(spec.lora_targets), task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, cfg)


def batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a shuffle seeded by (seed, epoch), so a resumed job sees the same order."""
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def collate(items: list[tuple[list[int], list[int]]], pad: int, device: torch.device | None = None
            ) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (x, y) in enumerate(items):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def last_checkpoint(job_dir: Path) -> Path | None:
    steps = [(int(p.name.split("-")[1]), p) for p in (job_dir / CHECKPOINTS).glob("step-*")
             if p.name.split("-")[1].isdigit() and (p / STATE).exists()]
    return max(steps)[1] if steps else None


def _save_checkpoint(job_dir: Path, model: Any, opt: torch.optim.Optimizer, step: int, tokens: int) -> Path:
    final = job_dir / CHECKPOINTS / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    torch.save({"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "step": step, "tokens": tokens},
               tmp / STATE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _resume(job_dir: Path, model: Any, opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(step, trained tokens) of the last checkpoint, loaded into the model and optimizer; (0, 0) without one."""
    ckpt = last_checkpoint(job_dir)
    if ckpt is None:
        return 0, 0
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors"), device=str(model.device)))
    state = torch.load(ckpt / STATE, weights_only=False, map_location=model.device)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"].cpu())
    return int(state["step"]), int(state["tokens"])


def train_supervised(spec: TrainSpec, job_dir: Path) -> dict[str, Any]:
    torch.manual_seed(spec.seed)
    base = resolve_checkpoint(spec.checkpoint, spec.base_dir)
    tok = Tokenizer(base)
    data = [supervised(tok, r["messages"], spec.max_length) for r in read_jsonl(job_dir / TRAIN)]
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_peft(spec, base).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.learning_rate)
    per_epoch = math.ceil(len(data) / spec.batch_size)
    total = per_epoch * spec.n_epochs if spec.max_steps is None else min(spec.max_steps, per_epoch * spec.n_epochs)
    step, tokens = _resume(job_dir, model, opt)
    progress = Progress(job_dir, total, step)
    progress.write("start", step=step, total_steps=total, examples=len(data), resumed=step > 0)
    model.train()
    while step < total:
        epoch, index = divmod(step, per_epoch)
        batch = collate([data[i] for i in batches(len(data), spec.batch_size, spec.seed, epoch)[index]], pad, device)
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        n = int(batch["attention_mask"].sum())
        step, tokens = step + 1, tokens + n
        progress.step(step, float(loss.detach()), n, time.perf_counter() - t0, tokens)
        if step % spec.checkpoint_every == 0 and step < total:
            path = _save_checkpoint(job_dir, model, opt, step, tokens)
            progress.write("checkpoint", step=step, path=str(path.relative_to(job_dir)), loss=float(loss.detach()))
    if (job_dir / VALIDATION).exists():
        _validate(spec, tok, pad, model, job_dir, progress)
    out = job_dir / ADAPTER
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(str(out))
    return {"step": step, "trained_tokens": tokens}


def _validate(spec: TrainSpec, tok: Tokenizer, pad: int, model: Any, job_dir: Path, progress: Progress) -> None:
    """Mean loss (per assistant token) of the trained adapter on the validation file."""
    data = [supervised(tok, r["messages"], spec.max_length) for r in read_jsonl(job_dir / VALIDATION)]
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), spec.batch_size):
            batch = collate(data[i:i + spec.batch_size], pad, model.device)
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            total, count = total + float(model(**batch).loss) * n, count + n
    progress.write("validation", loss=round(total / max(count, 1), 6), examples=len(data))
