"""Shared benchmark helpers: machine facts, process control, statistics, the results file and table."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
VENVS = ROOT / "bench" / ".venvs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import torch

        tv, gpu = torch.__version__, (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:
        tv, gpu = None, None
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "torch": tv, "gpu": gpu, "python": platform.python_version()}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def write_results(name: str, params: dict[str, Any], rows: list[dict[str, Any]], ratios: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    doc = {"name": name, "date": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit(),
           "machine": machine(), "params": params, "rows": rows, "ratios": ratios}
    out.write_text(json.dumps(doc, indent=2))
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| system | metric | median | min | max | unit |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['metric']} | {r['median']:.4g} | {r['min']:.4g} | {r['max']:.4g} | {r['unit']} |")


class Proc:
    """A server subprocess in its own process group, stopped whatever happens."""

    def __init__(self, cmd: list[str], *, env: dict[str, str] | None = None, cpu: str | None = None,
                 cwd: Path | None = None, log: Path | None = None):
        if cpu is not None and sys.platform.startswith("linux"):
            cmd = ["taskset", "-c", cpu, *cmd]
        self.log_path = log or Path(os.devnull)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     cwd=cwd, start_new_session=True)

    def wait_http(self, url: str, timeout: float = 180, ok: tuple[int, ...] = (200,)) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code in ok:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{url} not ready within {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


@contextlib.contextmanager
def running(procs: list[Proc]) -> Iterator[list[Proc]]:
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()
