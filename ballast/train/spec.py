"""What a job directory holds, and the job's settings as the platform wrote them (`config.json`)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG = "config.json"
TRAIN = "train.jsonl"
VALIDATION = "validation.jsonl"
PROGRESS = "progress.jsonl"
RESULT = "result.json"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
LOG = "worker.log"
BASE_LEARNING_RATE = 2e-4  # OpenAI's `learning_rate_multiplier` multiplies this


@dataclass
class TrainSpec:
    job_id: str
    method: str  # supervised, dpo
    checkpoint: str  # the base checkpoint as the deployment's ballast.yaml names it
    base_dir: str  # its package directory (a relative checkpoint is relative to it)
    n_epochs: int = 1
    batch_size: int = 4
    learning_rate: float = BASE_LEARNING_RATE
    beta: float = 0.1  # DPO
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    checkpoint_every: int = 10
    max_steps: int | None = None
    max_length: int = 1024
    seed: int = 0

    @classmethod
    def read(cls, job_dir: Path) -> TrainSpec:
        raw = json.loads((job_dir / CONFIG).read_text())
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Progress:
    """Appends one JSON line per event to progress.jsonl (the platform tails it into job events)."""

    def __init__(self, job_dir: Path, total_steps: int, start_step: int):
        self.path = job_dir / PROGRESS
        self.total = total_steps
        self.start_step = start_step
        self.started = time.monotonic()

    def write(self, kind: str, **data: Any) -> None:
        line = json.dumps({"type": kind, "ts": time.time(), **data}) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()

    def step(self, step: int, loss: float, tokens: int, step_s: float, trained_tokens: int) -> None:
        done = step - self.start_step
        per_step = (time.monotonic() - self.started) / max(done, 1)
        self.write("step", step=step, total_steps=self.total, loss=round(loss, 6), tokens=tokens,
                   tokens_per_s=round(tokens / step_s, 2) if step_s > 0 else None, step_s=round(step_s, 4),
                   trained_tokens=trained_tokens, eta_s=round(per_step * (self.total - step), 2))
