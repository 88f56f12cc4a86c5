"""Shared test helpers: free loopback ports and real `ballast serve` processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, ClassVar

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
    """A real `ballast serve` subprocess on a free loopback port; output captured to a log file.

    The log goes to `log_dir` (a test's tmp_path, kept by pytest for inspection) or else to a temporary
    file that `stop()` removes, so a test run leaves nothing in the system temp directory."""

    temp_logs: ClassVar[set[Path]] = set()  # temporary logs not yet removed (checked at session end)

    def __init__(self, package: Path, *, extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 log_dir: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if log_dir is not None:
            self.log_path = log_dir / f"replica-{self.port}.log"
            self._temp_log = False
        else:
            fd, name = tempfile.mkstemp(prefix="replica-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
            self._temp_log = True
            Replica.temp_logs.add(self.log_path)
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
        if self._temp_log:
            self.log_path.unlink(missing_ok=True)
            Replica.temp_logs.discard(self.log_path)


@pytest.fixture(scope="session", autouse=True)
def no_leftover_replica_logs() -> Iterator[None]:
    """Every temporary replica log is removed by the end of the session (a Replica someone forgot to stop)."""
    yield
    leftover = sorted(str(p) for p in Replica.temp_logs if p.exists())
    assert not leftover, f"replica logs left in the temp directory (Replica.stop() not called): {leftover}"


@pytest.fixture
def replica_factory(tmp_path: Path) -> Iterator:
    started: list[Replica] = []

    def start(package: Path, ready: bool = True, **kw) -> Replica:
        r = Replica(package, log_dir=tmp_path, **kw)
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


class Running:
    """A long-running CLI command (`ballast up`, `ballast dev`) whose output lines are collected as they come."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path | None = None):
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "ballast.cli.main", *args], env=env, text=True, cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._reader.join(10)
        return self.proc.returncode


@pytest.fixture
def running() -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(args: list[str], env: dict[str, str], cwd: Path | None = None) -> Running:
        started.append(Running(args, env, cwd))
        return started[-1]

    yield start
    for r in reversed(started):  # SIGTERM first: a platform stops its replicas
        r.stop()


MYPY_TEST = "tests/test_architecture.py::test_types_check"
MYPY_KEY = pytest.StashKey[tuple[subprocess.Popen[str], IO[str]]]()  # the running type check and its output


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the type check (about 80 s of one core) as soon as it is known to be wanted, at the lowest CPU
    priority: it then only takes what the other tests leave idle, and `test_types_check` collects its result."""
    if any(item.nodeid == MYPY_TEST for item in session.items):
        out = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  (closed in pytest_unconfigure)
        session.config.stash[MYPY_KEY] = (subprocess.Popen(
            [sys.executable, "-m", "mypy", "ballast"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True,
            preexec_fn=lambda: os.nice(19)), out)


def pytest_unconfigure(config: pytest.Config) -> None:
    started = config.stash.get(MYPY_KEY, None)
    if started is None:
        return
    proc, out = started
    if proc.poll() is None:  # the run ended before the type check was collected
        proc.kill()
        proc.wait(10)
    out.close()
