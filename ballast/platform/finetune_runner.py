"""The fine-tuning runner: a companion of the gateway in the platform process that starts queued jobs as
detached worker processes (`python -m ballast.train`, own session: a platform restart leaves them running),
tails their progress into job events, stops cancelled ones (SIGTERM to the process group, SIGKILL after a grace),
and marks the end. After a platform restart it re-adopts a running worker (same pid AND same start time), or,
when the worker died meanwhile, starts it again: it resumes from its last checkpoint.

On success the adapter is registered and, when the job names a gate, `call_gate` hands it to the evals gate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ballast.control.finetune import job_dir
from ballast.control.finetune_state import Active, FineTuneState, alive, proc_start
from ballast.platform.adapter_gate import ship_adapter

log = logging.getLogger("ballast.finetune")
MAX_ATTEMPTS = 3  # worker starts per job (the first and two resumes)
STOP_GRACE_S = 10.0


async def call_gate(ctx: Any, job: Active, adapter_dir: Path) -> Any | None:
    """THE call site of the evals gate (item 5): `ctx` is the platform's `EvalContext` (set by `create_app`);
    None when there is none (a gateway without the REST app)."""
    if ctx is None:
        return None
    gate = job.ballast["gate"]
    return await ship_adapter(ctx, deployment=job.ballast.get("deployment") or job.model,
                              env=job.ballast.get("env") or "production", adapter_dir=adapter_dir,
                              adapter_name=job.adapter_name, dataset=gate["dataset"], metric=gate["metric"],
                              margin=float(gate["margin"]), canary_percent=int(gate["canary_percent"]),
                              hold_s=float(gate["hold_s"]), job_id=job.id)


def _read_progress(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Whole new lines of progress.jsonl from `offset` (a line still being written waits for the next read)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    lines = []
    for raw in data[:end].splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines, offset + end


class FineTuneRunner:
    def __init__(self, state: FineTuneState, home: Path, gate_ctx: Any = None, *, max_running: int | None = None,
                 interval_s: float = 0.5):
        self.state = state
        self.home = home
        self.gate_ctx = gate_ctx
        self.max_running = max_running or int(os.environ.get("BALLAST_FINETUNE_MAX_JOBS") or 1)
        self.interval_s = interval_s
        self.children: dict[str, subprocess.Popen[bytes]] = {}  # workers this process started (to reap them)
        self.adopted: set[str] = set()
        self.gates: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Workers keep running (they are detached): the next platform re-adopts them."""
        if self._task:
            self._task.cancel()
        for t in list(self.gates):
            t.cancel()

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("fine-tuning runner tick failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def tick(self) -> None:
        running = 0
        for job in await asyncio.to_thread(self.state.active):
            if job.cancel:
                await asyncio.to_thread(self._stop, job)
            elif await self._supervise(job):
                running += 1
        for job_id in (await asyncio.to_thread(self.state.queued))[:max(0, self.max_running - running)]:
            await asyncio.to_thread(self._launch, job_id, False)

    # ---- one running job ------------------------------------------------------------------
    def _tail(self, job: Active) -> None:
        d = job_dir(self.home, job.id)
        lines, offset = _read_progress(d / "progress.jsonl", job.offset)
        if lines or offset != job.offset:
            self.state.progress(job.id, lines, offset, d)

    def _alive(self, job: Active) -> bool:
        child = self.children.get(job.id)
        if child is not None and child.pid == job.pid:
            return child.poll() is None
        return alive(job.pid, job.pid_start)

    async def _supervise(self, job: Active) -> bool:
        """Tail a running job; settle it when its worker is gone. True while it still runs."""
        await asyncio.to_thread(self._tail, job)
        if self._alive(job):
            if job.id not in self.children and job.id not in self.adopted:
                self.adopted.add(job.id)
                await asyncio.to_thread(self.state.add_event, job.id, f"Re-adopted worker pid {job.pid}")
            return True
        self.children.pop(job.id, None)
        d = job_dir(self.home, job.id)
        await asyncio.to_thread(self._tail, await asyncio.to_thread(self._refresh, job))
        try:
            result = json.loads((d / "result.json").read_text())
        except (OSError, ValueError):
            result = None
        if result is None:  # died without a word (killed, machine restart): resume from the last checkpoint
            if job.attempts < MAX_ATTEMPTS:
                await asyncio.to_thread(self._launch, job.id, True)
                return True
            await asyncio.to_thread(self.state.finish, job.id, False,
                                    error=f"the worker died {job.attempts} times; see worker.log in its job directory")
            return False
        ok = result.get("status") == "succeeded" and (d / "adapter" / "adapter_config.json").exists()
        done = await asyncio.to_thread(self.state.finish, job.id, ok, error=result.get("error"),
                                       trained_tokens=result.get("trained_tokens"), adapter_dir=d / "adapter")
        if done and ok and job.ballast.get("gate"):
            task = asyncio.create_task(self._gate(job, d / "adapter"))
            self.gates.add(task)
            task.add_done_callback(self.gates.discard)
        return False

    def _refresh(self, job: Active) -> Active:
        return next((a for a in self.state.active() if a.id == job.id), job)

    async def _gate(self, job: Active, adapter_dir: Path) -> None:
        try:
            result = await call_gate(self.gate_ctx, job, adapter_dir)
        except Exception as e:
            log.exception("the gate failed for %s", job.id)
            await asyncio.to_thread(self.state.add_event, job.id, f"gate failed: {type(e).__name__}: {e}", "error")
            return
        message = "gate skipped: not available" if result is None else (
            f"Gate {result.decision}: {result.metric} {result.candidate_score:.3f} (candidate, version "
            f"{result.candidate_version}) vs {result.production_score:.3f} (production, version "
            f"{result.production_version})")
        await asyncio.to_thread(self.state.add_event, job.id, message)

    # ---- processes ------------------------------------------------------------------------
    def _launch(self, job_id: str, resume: bool) -> None:
        d = job_dir(self.home, job_id)
        (d / "result.json").unlink(missing_ok=True)
        log_file = os.fdopen(os.open(d / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        try:
            proc = subprocess.Popen([sys.executable, "-m", "ballast.train", str(d)], stdout=log_file,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    cwd=str(d))
        finally:
            log_file.close()
        if self.state.started(job_id, proc.pid, proc_start(proc.pid), resume):
            self.children[job_id] = proc
        else:
            _kill_group(proc.pid, proc)

    def _stop(self, job: Active) -> None:
        if job.pid is not None and self._alive(job):
            _kill_group(job.pid, self.children.get(job.id))
        self.children.pop(job.id, None)
        self.state.stopped(job.id)


def _kill_group(pid: int, child: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the worker's process group, SIGKILL it after STOP_GRACE_S; reap it when it is ours."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if child is not None and child.poll() is not None:
                return
            if child is None and proc_start(pid) is None:
                return
            time.sleep(0.05)
    if child is not None:
        child.poll()
