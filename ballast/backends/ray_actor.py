"""The Ray actor behind one replica: it lives on a cluster node and runs `ballast serve` there.

It gets the package as tar.gz bytes through Ray's object store (never a shared filesystem), unpacks
it into a private directory of its node, starts the same replica runtime as the local backend
(`ballast serve`, a child process in its own session) on a free port of the node's address, and
answers the platform's questions: where it listens, whether the replica still runs, its log. No Ray
import here: the module is plain Python, wrapped by `ray.remote` in `ballast.backends.ray`.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

from ballast.observe import free_port

MAX_LOG_CHUNK = 1 << 20


class ReplicaActor:
    def __init__(self, replica_id: str, package_tgz: bytes, command: list[str], args: list[str],
                 env: dict[str, str], host: str):
        self.replica_id = replica_id
        self.dir = Path(tempfile.mkdtemp(prefix=f"ballast-replica-{replica_id}-"))
        package = self.dir / "package"
        package.mkdir()
        with tarfile.open(fileobj=io.BytesIO(package_tgz), mode="r:gz") as tar:
            tar.extractall(package, filter="data")
        self.host = host
        self.port = free_port(host)
        self.log_path = self.dir / "replica.log"
        # Ray sets CUDA_VISIBLE_DEVICES of this worker to the GPUs it reserved: the child inherits them.
        child_env = {**os.environ, **env, "BALLAST_PORT": str(self.port), "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            log.write(f"--- starting replica {replica_id} on {host}:{self.port}\n".encode())
            log.flush()
            self.proc = subprocess.Popen([*command, str(package), "--host", host, "--port", str(self.port), *args],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=child_env, start_new_session=True, close_fds=True)

    def info(self) -> dict[str, Any]:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return {"replica_id": self.replica_id, "url": f"http://{shown}:{self.port}", "pid": self.proc.pid,
                "port": self.port, "node": self.host}

    def poll(self, offset: int) -> dict[str, Any]:
        """Liveness and the log written since `offset` (-1: nothing, just the current end), in one round trip."""
        code = self.proc.poll()
        data = b""
        try:
            size = self.log_path.stat().st_size
            if offset < 0 or offset > size:
                offset = size
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                data = f.read(MAX_LOG_CHUNK)
        except OSError:
            offset = max(offset, 0)
        return {"alive": code is None, "exit_code": code, "log": data, "offset": offset + len(data)}

    def tail(self, n: int) -> list[str]:
        try:
            with open(self.log_path, errors="replace") as f:
                return [line.rstrip("\n") for line in deque(f, maxlen=n)]
        except OSError:
            return []

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM (the replica drains), SIGKILL after `grace_s`; then the private directory goes."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            deadline = time.monotonic() + max(grace_s, 0.0)
            while time.monotonic() < deadline and self.proc.poll() is None:
                time.sleep(0.05)
            if self.proc.poll() is None:
                self._signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.proc.poll()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                self.proc.send_signal(sig)
