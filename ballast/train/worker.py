"""The worker's entry point: read the job directory, train, write `result.json` (succeeded or failed)."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

from ballast.train.spec import RESULT, Progress, TrainSpec, write_json_atomic

log = logging.getLogger("ballast.train")


def run(job_dir: Path) -> int:
    spec = TrainSpec.read(job_dir)
    threads = os.environ.get("BALLAST_TRAIN_THREADS")
    if threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))
    try:
        if spec.method == "dpo":
            from ballast.train.dpo import train_dpo

            result = train_dpo(spec, job_dir)
        else:
            from ballast.train.sft import train_supervised

            result = train_supervised(spec, job_dir)
    except Exception as e:
        traceback.print_exc()
        Progress(job_dir, 0, 0).write("error", message=f"{type(e).__name__}: {e}")
        write_json_atomic(job_dir / RESULT, {"status": "failed", "error": f"{type(e).__name__}: {e}"})
        return 1
    write_json_atomic(job_dir / RESULT, {"status": "succeeded", **result})
    return 0


def main(argv: list[str]) -> int:
    os.umask(0o077)  # everything it writes (progress, checkpoints, the adapter) is the platform user's alone
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m ballast.train JOB_DIR", file=sys.stderr)
        return 2
    return run(Path(argv[0]))
