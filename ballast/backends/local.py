"""Replicas as local processes: `ballast serve` on free loopback ports, output captured per replica.

Replica processes run in their own session (so a Ctrl-C meant for `ballast up` is not delivered to
them twice), and carry `BALLAST_INSTANCE` in their environment: a platform that is killed hard
leaves them running, and the next platform process re-adopts them by pid, checking the environment
so that a reused pid is never mistaken for a replica. A platform that stops cleanly stops them.

Logs go to `<logs_dir>/<deployment>/v<version>-<replica>.log`, opened in append mode so that
`rotate()` can copy-and-truncate them while the replica keeps writing (also after a re-adoption).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from ballast.backends.base import ReplicaHandle, ReplicaSpec, ReplicaStatus
from ballast.backends.resources import machine_capacity, place
from ballast.home import ballast_home
from ballast.observe import free_port

LOG_MAX_BYTES = int(os.environ.get("BALLAST_LOG_MAX_BYTES") or 10 * 2**20)
LOG_BACKUPS = 2


def default_command() -> list[str]:
    """How a replica is launched; `BALLAST_REPLICA_COMMAND` overrides it (shell words)."""
    if cmd := os.environ.get("BALLAST_REPLICA_COMMAND"):
        return shlex.split(cmd)
    return [sys.executable, "-m", "ballast.cli.main", "serve"]


def _environ(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    out: dict[str, str] = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep and k.startswith(b"BALLAST_"):
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(") ", 1)[1].startswith(("Z", "X"))


def tail_file(path: str | None, n: int) -> list[str]:
    """The last `n` lines of a replica's log file (none when it does not exist)."""
    if not path or not Path(path).exists():
        return []
    with open(path, errors="replace") as f:
        return [line.rstrip("\n") for line in deque(f, maxlen=n)]


def rotate_file(path_: str | None, max_bytes: int = LOG_MAX_BYTES) -> None:
    """Copy-and-truncate a replica's log once it is over `max_bytes` (keeps LOG_BACKUPS old files), so the
    writer (a replica process, or the Ray backend's copy) keeps appending to the same file."""
    if not path_:
        return
    path = Path(path_)
    try:
        if path.stat().st_size <= max_bytes:
            return
    except OSError:
        return
    for i in range(LOG_BACKUPS - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{i + 1}"))
    shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    with open(path, "r+b") as f:
        f.truncate(0)


class LocalBackend:
    """Replicas as subprocesses of this machine, listening on free loopback ports."""

    def __init__(
        self,
        instance_id: str,
        *,
        logs_dir: Path | None = None,
        command: list[str] | None = None,
        extra_args: list[str] | None = None,
        host: str = "127.0.0.1",
        name: str = "local",
    ):
        self.name = name
        self.instance_id = instance_id
        self.logs_dir = logs_dir or ballast_home() / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.command = command or default_command()
        self.extra_args = list(extra_args or [])
        self.host = host
        self._procs: dict[int, subprocess.Popen[bytes]] = {}  # by pid: a replaced replica keeps its id
        self._gpus: dict[int, list[int]] = {}  # GPU indices held by each live replica process, by pid

    def _placement(self, spec: ReplicaSpec) -> tuple[list[int], str | None]:
        busy = {i for idx in self._gpus.values() for i in idx}
        cap = machine_capacity(with_gpus=bool(spec.resources.accelerator))
        return place(spec.resources, cap, busy, self.name)

    # ---- protocol ------------------------------------------------------------------------------
    def fits(self, spec: ReplicaSpec) -> str | None:
        return self._placement(spec)[1]

    def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        gpus, reason = self._placement(spec)
        if reason:
            raise RuntimeError(reason)
        port = free_port(self.host)
        log_dir = self.logs_dir / spec.deployment
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"v{spec.version}-{spec.replica_id}.log"
        cmd = [*self.command, str(spec.package_path), "--host", self.host, "--port", str(port), *self.extra_args]
        env = {
            **os.environ,
            **spec.env,
            "BALLAST_INSTANCE": self.instance_id,
            "BALLAST_POOL": self.name,  # several local pools share an instance id: list() tells them apart
            "BALLAST_REPLICA_ID": spec.replica_id,
            "BALLAST_DEPLOYMENT": spec.deployment,
            "BALLAST_VERSION": str(spec.version),
            "BALLAST_PORT": str(port),
            "PYTHONUNBUFFERED": "1",
        }
        if spec.resources.accelerator:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        with open(log_path, "ab") as log:
            log.write(f"--- starting replica {spec.replica_id} of {spec.deployment} v{spec.version} "
                      f"on port {port}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True, close_fds=True)
        self._procs[proc.pid] = proc
        if gpus:
            self._gpus[proc.pid] = gpus
        return ReplicaHandle(spec.replica_id, f"http://{self.host}:{port}", proc.pid, port, str(log_path), self.name,
                             {"gpus": gpus} if gpus else {})

    def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        if handle.pid is None:
            return
        self._signal(handle, signal.SIGTERM)
        deadline = time.monotonic() + max(grace_s, 0.0)
        while time.monotonic() < deadline and self.inspect(handle).alive:
            time.sleep(0.05)
        if self.inspect(handle).alive:
            self._signal(handle, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.inspect(handle).alive:
                time.sleep(0.02)
        self._gpus.pop(handle.pid, None)
        proc = self._procs.pop(handle.pid, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def list(self) -> list[ReplicaHandle]:
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            env = _environ(pid)
            if not env or env.get("BALLAST_INSTANCE") != self.instance_id or "BALLAST_REPLICA_ID" not in env:
                continue
            if env.get("BALLAST_POOL", "local") != self.name:
                continue
            if _is_zombie(pid):
                continue
            # Only the replica's own process (the session leader), not children it started.
            with contextlib.suppress(OSError):
                if os.getsid(pid) != pid:
                    continue
            port = int(env["BALLAST_PORT"]) if env.get("BALLAST_PORT", "").isdigit() else None
            url = f"http://{self.host}:{port}" if port else None
            out.append(ReplicaHandle(env["BALLAST_REPLICA_ID"], url, pid, port, None, self.name))
        return out

    def inspect(self, handle: ReplicaHandle) -> ReplicaStatus:
        status = self._inspect(handle)
        if not status.alive and handle.pid:
            self._gpus.pop(handle.pid, None)
        return status

    def _inspect(self, handle: ReplicaHandle) -> ReplicaStatus:
        proc = self._procs.get(handle.pid) if handle.pid else None
        if proc is not None:
            code = proc.poll()
            return ReplicaStatus(code is None, code, "" if code is None else f"exited with code {code}")
        if not handle.pid:
            return ReplicaStatus(False, None, "no process")
        env = _environ(handle.pid)
        if env is None or _is_zombie(handle.pid):
            return ReplicaStatus(False, None, "process is gone")
        if env.get("BALLAST_REPLICA_ID") != handle.replica_id:
            return ReplicaStatus(False, None, "process is gone (its pid now belongs to another process)")
        if handle.data.get("gpus"):  # re-adopted after a restart: its GPUs are still taken
            self._gpus[handle.pid] = list(handle.data["gpus"])
        return ReplicaStatus(True)

    def logs(self, handle: ReplicaHandle, tail: int) -> builtins.list[str]:  # `list` is a method here
        return tail_file(handle.log_path, tail)

    # ---- local extras --------------------------------------------------------------------------
    def rotate(self, handle: ReplicaHandle, max_bytes: int = LOG_MAX_BYTES) -> None:
        rotate_file(handle.log_path, max_bytes)

    def _signal(self, handle: ReplicaHandle, sig: int) -> None:
        if not handle.pid:
            return
        status = self.inspect(handle)
        if not status.alive:
            return
        try:
            os.killpg(handle.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(handle.pid, sig)
