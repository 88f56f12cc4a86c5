"""Replicas as local processes: `ballast serve` on free loopback ports, output captured per replica.

Replica processes run in their own session, so a platform that is killed hard (kill -9) leaves them
running and the next platform process re-adopts them by pid and port; a platform that stops cleanly
stops them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from ballast.backends.base import ReplicaHandle, ReplicaSpec
from ballast.home import ballast_home

LOG_ROTATE_BYTES = 20 * 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rotate(path: Path) -> None:
    if path.exists() and path.stat().st_size > LOG_ROTATE_BYTES:
        old = path.with_suffix(path.suffix + ".1")
        with contextlib.suppress(OSError):
            old.unlink()
        path.rename(old)


class LocalBackend:
    name = "local"

    def __init__(self, python: str | None = None, logs_dir: Path | None = None):
        self.python = python or sys.executable
        self.logs_dir = logs_dir or ballast_home() / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        port = _free_port()
        log_path = self.logs_dir / f"{spec.deployment}-v{spec.version}-{spec.replica_id}.log"
        _rotate(log_path)
        cmd = [self.python, "-m", "ballast.cli.main", "serve", str(spec.package_path), "--host", "127.0.0.1",
               "--port", str(port)]
        if not spec.isolation:
            cmd.append("--no-isolation")
        env = {**os.environ, **spec.env, "BALLAST_REPLICA_ID": spec.replica_id,
               "BALLAST_DEPLOYMENT": spec.deployment, "BALLAST_VERSION": str(spec.version)}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        self._procs[spec.replica_id] = proc
        return ReplicaHandle(spec.replica_id, f"http://127.0.0.1:{port}", proc.pid, port, str(log_path))

    def _signal(self, handle: ReplicaHandle, sig: int) -> None:
        if handle.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(handle.pid, sig)

    def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        self._signal(handle, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.alive(handle):
            time.sleep(0.05)
        if self.alive(handle):
            self._signal(handle, signal.SIGKILL)
        proc = self._procs.pop(handle.replica_id, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def alive(self, handle: ReplicaHandle) -> bool:
        proc = self._procs.get(handle.replica_id)
        if proc is not None:
            return proc.poll() is None
        if not handle.pid:
            return False
        try:
            os.kill(handle.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A zombie or a reused pid is not our replica.
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{handle.pid}/stat").read_text()
            if stat.split(") ", 1)[1].startswith("Z"):
                return False
            cmdline = Path(f"/proc/{handle.pid}/cmdline").read_bytes()
            return b"ballast" in cmdline
        return True

    def adopt(self, handle: ReplicaHandle) -> bool:
        return self.alive(handle)

    def logs(self, handle: ReplicaHandle, tail: int) -> list[str]:
        if not handle.log_path or not Path(handle.log_path).exists():
            return []
        with open(handle.log_path, errors="replace") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=tail)]
