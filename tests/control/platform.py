"""A real `ballast up` subprocess on a free loopback port with its own BALLAST_HOME (and store)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port

FAST_ENV = {
    "BALLAST_DRAIN_S": "0.3",
    "BALLAST_BACKOFF_BASE_S": "0.5",
    "BALLAST_BACKOFF_MAX_S": "2",
    "BALLAST_RECONCILE_INTERVAL_S": "0.2",
}


class Platform:
    def __init__(self, home: Path, database_url: str | None = None, retire_grace_s: float = 30.0,
                 port: int | None = None, args: tuple[str, ...] = ()):
        self.home = home
        self.database_url = database_url
        self.retire_grace_s = retire_grace_s
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **FAST_ENV, "BALLAST_HOME": str(home)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = home / f"platform-{self.port}.log"
        self.key: str | None = None
        self.args = args

    def start(self, timeout: float = 60) -> Platform:
        cmd = [sys.executable, "-m", "ballast.cli.main", "up", "--port", str(self.port), "--no-isolation",
               "--retire-grace-s", str(self.retire_grace_s), *self.args]
        if self.database_url:
            cmd += ["--database-url", self.database_url]
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open by the child)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"platform exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError(f"platform not up within {timeout}s:\n{self.output()}")
        self.key = json.loads((self.home / "credentials.json").read_text())["api_key"]
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self, method: str, path: str, expect: int | None = 200, **kw: Any) -> Any:
        r = httpx.request(method, self.url + "/api/v1" + path, headers={"Authorization": f"Bearer {self.key}"},
                          timeout=30, **kw)
        if expect is not None:
            assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text

    def show(self, name: str) -> dict[str, Any]:
        return self.api("GET", f"/deployments/{name}")

    def wait(self, what: str, cond: Callable[[], Any], timeout: float = 60, every: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = cond()
            if last:
                return last
            time.sleep(every)
        raise AssertionError(f"timed out waiting for {what}; last={last!r}\n--- platform log ---\n"
                             f"{self.output()[-4000:]}")

    def wait_serving(self, name: str, version: int, env: str = "production", timeout: float = 60) -> dict[str, Any]:
        def ok() -> Any:
            ep = self.api("GET", f"/deployments/{name}/environments/{env}/endpoints", expect=None)
            if not isinstance(ep, dict) or "targets" not in ep:
                return None
            t = [t for t in ep["targets"] if t["version"] == version and t["replicas"]]
            return ep if t else None

        return self.wait(f"{name} v{version} serving {env}", ok, timeout)

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "BALLAST_URL": self.url, "COLUMNS": "250"}  # wide tables: no wrapped cells
        p = subprocess.run([sys.executable, "-m", "ballast.cli.main", *args], env=env, capture_output=True, text=True,
                           timeout=timeout)
        if check:
            assert p.returncode == 0, f"ballast {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}"
        return p

    def replica_pids(self) -> list[int]:
        out = []
        for d in self.api("GET", "/deployments")["data"]:
            out += [r["pid"] for r in self.show(d["name"])["replicas"] if r["pid"]]
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig) if sig == signal.SIGINT else self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return not stat.rsplit(") ", 1)[1].startswith(("Z", "X"))


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        if pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
