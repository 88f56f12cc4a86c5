"""Replicas on a Ray cluster, driven from the platform through the pool's own agent process.

Ray connects a process to one cluster, for good. So the platform process connects to none: each Ray pool's
`RayBackend` starts `python -m ballast.backends.ray_agent` (its child, in a session of its own), which holds
that cluster's connection and runs the replicas as detached, named actors (`ray_cluster.RayCluster`). The
backend talks to it over the agent's stdin and stdout, one JSON line per call (`ray_wire`); any number of Ray
clusters can then be pools of one platform.

An agent that dies is restarted (with a backoff) and re-adopts the actors by name, as after a platform restart;
while it restarts the pool stays up for `AGENT_GRACE_S`, since its replicas still serve. A cluster that does not
answer a ping in 2 s (`BALLAST_RAY_PING_TIMEOUT_S`) makes `ping` fail, so the pool is failed over; meanwhile
calls that need the cluster answer at once instead of waiting on it.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import importlib.util
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import IO, Any

from ballast.backends import ray_wire as wire
from ballast.backends.base import ReplicaHandle, ReplicaSpec, ReplicaStatus
from ballast.backends.local import default_command, rotate_file, tail_file
from ballast.home import ballast_home
from ballast.observe.replica_auth import ENV as TOKEN_ENV
from ballast.observe.replica_auth import token_for

log = logging.getLogger("ballast.backends.ray")
CALL_TIMEOUT_S = 15.0
INSPECT_TIMEOUT_S = 5.0
PING_TIMEOUT_S = 2.0  # default of BALLAST_RAY_PING_TIMEOUT_S: with checks every 2 s, a lost cluster is down in < 5 s
AGENT_GRACE_S = 30.0  # an agent restarting this long (or failing to) takes its pool down
RESTART_MAX_S = 30.0


class AgentDown(RuntimeError):
    """The pool's agent is not running (it is being restarted)."""


class RayBackend:
    """One Ray cluster as a pool: the Backend protocol, carried out by the pool's agent process."""

    def __init__(self, instance_id: str, *, address: str | None = None, logs_dir: Path | None = None,
                 command: list[str] | None = None, extra_args: list[str] | None = None, name: str = "ray",
                 start_timeout_s: float | None = None):
        if importlib.util.find_spec("ray") is None:
            raise ValueError("the Ray backend needs Ray: pip install 'ballast[ray]'")
        self.name = name
        self.instance_id = instance_id
        self.address = address or os.environ.get("RAY_ADDRESS") or "auto"
        self.logs_dir = logs_dir or ballast_home() / "logs"
        self.command = command or default_command()
        self.extra_args = list(extra_args or [])
        self.start_timeout_s = start_timeout_s or float(os.environ.get("BALLAST_RAY_START_TIMEOUT_S") or 120)
        self.agent_start_s = float(os.environ.get("BALLAST_RAY_AGENT_START_S") or 90)
        self.ping_timeout_s = float(os.environ.get("BALLAST_RAY_PING_TIMEOUT_S") or PING_TIMEOUT_S)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[Any]] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._down_since: float | None = None  # when the agent went away (None: it runs)
        self._why = ""  # why the agent is not running, when a restart failed
        self._restarting = False
        self._closed = False
        self._ping: tuple[float, Future[Any]] | None = None  # the ping in flight (one at a time)
        self._unreachable: str | None = None  # why the last ping failed (None: it answered)
        self._spawn()
        atexit.register(self.close)

    # ---- the agent -----------------------------------------------------------------------------
    @property
    def agent_pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None else None

    def _agent_command(self) -> list[str]:
        cmd = [sys.executable, "-m", "ballast.backends.ray_agent", "--address", self.address, "--instance",
               self.instance_id, "--name", self.name, "--logs-dir", str(self.logs_dir), "--command",
               json.dumps(self.command), "--extra-args", json.dumps(self.extra_args), "--start-timeout",
               str(self.start_timeout_s)]
        return cmd

    def _spawn(self) -> None:
        """Start the agent and wait until it is connected; raises with its reason when it cannot connect."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        with open(self.logs_dir / "ray-agent.log", "ab") as err:
            proc = subprocess.Popen(self._agent_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=err, start_new_session=True, close_fds=True)
        hello: Future[Any] = Future()
        with self._lock:
            self._pending[wire.HELLO] = hello
        threading.Thread(target=self._read, args=(proc,), daemon=True, name=f"ballast-ray-{self.name}").start()
        try:
            hello.result(timeout=self.agent_start_s)
        except Exception as e:
            _kill(proc)
            why = "did not connect in time" if isinstance(e, FutureTimeout) else str(e)
            raise RuntimeError(f"the Ray agent of pool {self.name} cannot connect to {self.address}: {why}") from None
        with self._lock:
            self._proc, self._down_since, self._why, self._ping = proc, None, "", None
        if proc.poll() is not None:  # it died right after saying hello, before it was recorded: restart it
            self._lost(proc, proc.returncode)

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                message = wire.decode(line)
            except ValueError:
                continue
            with self._lock:
                fut = self._pending.pop(message["id"], None)
            if fut is None or fut.done():
                continue
            if "error" in message:
                fut.set_exception(RuntimeError(str(message["error"])))
            else:
                fut.set_result(message.get("ok"))
        code = proc.wait()
        self._lost(proc, code)

    def _lost(self, proc: subprocess.Popen[bytes], code: int) -> None:
        """The agent exited: fail what waits on it, and restart it unless the backend is closed."""
        with self._lock:
            was_running = self._proc is proc
            if was_running or self._proc is None:  # its calls (or the hello of one starting) wait in vain
                for fut in self._pending.values():
                    if not fut.done():
                        fut.set_exception(AgentDown(f"the Ray agent of pool {self.name} exited (code {code})"))
                self._pending = {}
            if not was_running:
                return
            self._proc, self._down_since, self._ping = None, time.monotonic(), None
            restart = not self._closed and not self._restarting
            self._restarting = self._restarting or restart
        if restart:
            log.warning("the Ray agent of pool %s exited (code %s); restarting it", self.name, code)
            threading.Thread(target=self._restart, daemon=True, name=f"ballast-ray-{self.name}-restart").start()

    def _restart(self) -> None:
        delay = 1.0
        try:
            while not self._closed:
                try:
                    self._spawn()
                    log.warning("the Ray agent of pool %s runs again (pid %s)", self.name, self.agent_pid)
                    return
                except Exception as e:
                    self._why = str(e)
                    log.warning("%s; trying again in %gs", e, delay)
                time.sleep(delay)
                delay = min(delay * 2, RESTART_MAX_S)
        finally:
            self._restarting = False

    def close(self) -> None:
        """Stop the agent (the replicas' actors keep running; stop them first to stop them)."""
        self._closed = True
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(OSError):
                _stdin(proc).close()  # the agent leaves when its stdin ends
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                _kill(proc)

    # ---- calls ---------------------------------------------------------------------------------
    def _send(self, op: str, args: dict[str, Any]) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._lock:
            proc = self._proc
            if proc is None:
                raise AgentDown(self._why or f"the Ray agent of pool {self.name} is restarting")
            call_id = next(self._ids)
            self._pending[call_id] = fut
            try:
                stdin = _stdin(proc)
                stdin.write(wire.encode({"id": call_id, "op": op, "args": args}))
                stdin.flush()
            except OSError as e:
                self._pending.pop(call_id, None)
                raise AgentDown(f"the Ray agent of pool {self.name} is gone: {e}") from None
        fut.add_done_callback(lambda _f: self._forget(call_id))
        return fut

    def _forget(self, call_id: int) -> None:
        with self._lock:
            self._pending.pop(call_id, None)

    def _call(self, op: str, args: dict[str, Any], timeout: float) -> Any:
        fut = self._send(op, args)
        try:
            return fut.result(timeout=timeout)
        except FutureTimeout:
            self._forget_future(fut)
            raise TimeoutError(f"the Ray agent of pool {self.name} did not answer `{op}` in {timeout:g}s") from None

    def _forget_future(self, fut: Future[Any]) -> None:
        with self._lock:
            for k, v in list(self._pending.items()):
                if v is fut:
                    del self._pending[k]

    def _cluster_reason(self, e: BaseException | str) -> str:
        what = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
        return f"the Ray cluster ({self.name}) did not answer: {what}"

    # ---- health --------------------------------------------------------------------------------
    def ping(self) -> None:
        """Raises when the cluster does not answer in `ping_timeout_s` or has no live node (the pool's health
        check), or when the agent has been away longer than AGENT_GRACE_S."""
        now = time.monotonic()
        down_since = self._down_since
        if self._proc is None and down_since is not None:
            if now - down_since < AGENT_GRACE_S and not self._why:
                return  # restarting: the replicas still serve meanwhile
            raise AgentDown(self._why or f"the Ray agent of pool {self.name} has been restarting for "
                            f"{now - down_since:.0f}s")
        if self._ping is None:
            self._ping = (now, self._send("ping", {}))
        started, fut = self._ping
        try:
            fut.result(timeout=max(0.0, started + self.ping_timeout_s - now))
        except FutureTimeout:  # keep it in flight: a cluster that hangs gets one ping at a time
            self._unreachable = f"no answer in {self.ping_timeout_s:g}s"
            raise TimeoutError(f"the Ray cluster of pool {self.name} did not answer in {self.ping_timeout_s:g}s") \
                from None
        except Exception as e:
            self._ping, self._unreachable = None, f"{type(e).__name__}: {e}"
            raise
        self._ping, self._unreachable = None, None

    # ---- protocol ------------------------------------------------------------------------------
    def fits(self, spec: ReplicaSpec) -> str | None:
        if self._unreachable:
            return self._cluster_reason(self._unreachable)
        try:
            reason = self._call("fits", {"spec": wire.spec_to(spec)}, CALL_TIMEOUT_S)
        except Exception as e:  # the cluster is unreachable: wait (pending, with why) rather than fail the tick
            return self._cluster_reason(e)
        return None if reason is None else str(reason)

    def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        sent = wire.spec_to(spec)
        if token := token_for(spec.replica_id):  # it listens on its node's address: only the platform may call it
            sent["env"][TOKEN_ENV] = token
        return wire.handle_of(self._call("start", {"spec": sent}, self.start_timeout_s + CALL_TIMEOUT_S))

    def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        try:
            self._call("stop", {"handle": wire.handle_to(handle), "grace_s": grace_s}, grace_s + 2 * CALL_TIMEOUT_S)
        except Exception as e:  # an unreachable cluster: its actor is an orphan, stopped when it is listed again
            log.warning("pool %s: could not stop replica %s: %s", self.name, handle.replica_id, e)

    def list(self) -> builtins.list[ReplicaHandle]:
        if self._unreachable:
            raise RuntimeError(self._cluster_reason(self._unreachable))
        return [wire.handle_of(h) for h in self._call("list", {}, 4 * CALL_TIMEOUT_S)]

    def inspect(self, handle: ReplicaHandle) -> ReplicaStatus:
        if self._unreachable:  # the cluster, not the replica, is unreachable: HTTP probes decide meanwhile
            return ReplicaStatus(True, None, self._cluster_reason(self._unreachable))
        try:
            return wire.status_of(self._call("inspect", {"handle": wire.handle_to(handle)}, INSPECT_TIMEOUT_S))
        except Exception as e:
            return ReplicaStatus(True, None, self._cluster_reason(e))

    def logs(self, handle: ReplicaHandle, tail: int) -> builtins.list[str]:
        if not self._unreachable:
            with contextlib.suppress(Exception):
                return [str(line) for line in self._call("logs", {"handle": wire.handle_to(handle), "tail": tail},
                                                         CALL_TIMEOUT_S)]
        return tail_file(handle.log_path, tail)  # the copy made here

    def rotate(self, handle: ReplicaHandle) -> None:
        """The copied log is rotated as a local replica's is."""
        rotate_file(handle.log_path)


def _stdin(proc: subprocess.Popen[bytes]) -> IO[bytes]:
    assert proc.stdin is not None
    return proc.stdin


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
