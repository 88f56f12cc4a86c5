"""Shared test helpers: free loopback ports and real `ballast serve` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ballast.observe import free_port

__all__ = ["free_port"]  # re-exported: the tests import it from here

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def write_package(root: Path, yaml: str, model: str | None = None, **files: str) -> Path:
    """Write a package directory from inline (dedented) file texts."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "ballast.yaml").write_text(textwrap.dedent(yaml))
    if model is not None:
        (root / "model.py").write_text(textwrap.dedent(model))
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    return root


class Replica:
    """A real `ballast serve` subprocess on a free loopback port; output captured to a log file."""

    def __init__(self, package: Path, *, extra_args: list[str] | None = None, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="replica-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        cmd = [sys.executable, "-m", "ballast.cli.main", "serve", str(package), "--port", str(self.port),
               *(["--no-isolation"] if extra_args is None else extra_args)]
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def wait_listening(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"replica exited with {self.proc.returncode}:\n{self.output()}")
            try:
                httpx.get(self.url + "/health/live", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise AssertionError(f"replica did not listen within {timeout}s:\n{self.output()}")

    def wait_ready(self, timeout: float = 120) -> None:
        self.wait_listening(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if httpx.get(self.url + "/health/ready", timeout=5).status_code == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"replica not ready within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


@pytest.fixture
def replica_factory() -> Iterator:
    started: list[Replica] = []

    def start(package: Path, ready: bool = True, **kw) -> Replica:
        r = Replica(package, **kw)
        started.append(r)
        if ready:
            r.wait_ready()
        return r

    yield start
    for r in started:
        r.stop()


@pytest.fixture
def tmp_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh BALLAST_HOME for one test (processes it starts inherit it)."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("BALLAST_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint with a locally trained tokenizer, made by `ballast models make-tiny`."""
    out = tmp_path_factory.mktemp("tiny-llm") / "ckpt"
    r = subprocess.run([sys.executable, "-m", "ballast.cli.main", "models", "make-tiny", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out
