"""Shared benchmark helpers: machine facts, processes that are always stopped, a load generator (wrk),
statistics, and the results file and table in the schema of /work/shared/BENCHMARKS.md."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
VENVS = ROOT / "bench" / ".venvs"


# ---- machine and versions ------------------------------------------------------------------------
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
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions(*dists: str, python: str | Path | None = None) -> dict[str, str | None]:
    """Installed versions of distributions, here or in another interpreter (a peer's venv)."""
    if python is None:
        found: dict[str, str | None] = {}
        for d in dists:
            try:
                found[d] = importlib.metadata.version(d)
            except importlib.metadata.PackageNotFoundError:
                found[d] = None
        return found
    code = ("import importlib.metadata as m, json, sys\nd = {}\nfor n in sys.argv[1:]:\n"
            "    try: d[n] = m.version(n)\n    except m.PackageNotFoundError: d[n] = None\nprint(json.dumps(d))")
    out = subprocess.run([str(python), "-c", code, *dists], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def venv_python(name: str, *requirements: str) -> Path:
    """The Python of bench/.venvs/<name>, created (with `requirements` from PyPI) on first use."""
    py = VENVS / name / "bin" / "python"
    if not py.exists():
        print(f"installing {' '.join(requirements)} into {py.parents[1].relative_to(ROOT)} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(py.parents[1])], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *requirements], check=True)
    return py


# ---- processes -----------------------------------------------------------------------------------
def ballast_cli() -> str:
    """The `ballast` command of this interpreter's environment."""
    script = Path(sys.executable).parent / "ballast"
    return str(script) if script.exists() else "ballast"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cmd: list[str], cpus: str | None) -> list[str]:
    """`cmd` pinned to `cpus` (e.g. "0" or "0-1") with taskset, when both are available."""
    if cpus is None or not shutil.which("taskset"):
        return cmd
    return ["taskset", "-c", cpus, *cmd]


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that `finally` blocks (which stop servers) run."""

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


class Proc:
    """A server subprocess in its own process group (stdout+stderr to a log file), stopped whatever happens."""

    def __init__(self, cmd: list[str], *, env: dict[str, str] | None = None, cpus: str | None = None,
                 cwd: Path | None = None, log: Path | None = None):
        self.cmd = pinned(cmd, cpus)
        self.log_path = log or Path(tempfile.mkstemp(prefix="bench-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.cmd} exited ({self.proc.returncode}); log {self.log_path}:\n{tail}")

    def wait_line(self, pattern: str, timeout: float = 180) -> re.Match[str]:
        """Wait for a line of output matching the regex `pattern`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log_path.read_text(errors="replace"), re.M)
            if m:
                return m
            self._check_alive()
            time.sleep(0.1)
        raise RuntimeError(f"no line matching {pattern!r} within {timeout}s; see {self.log_path}")

    def wait_http(self, url: str, timeout: float = 180, ok: tuple[int, ...] = (200,)) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code in ok:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{url} not ready within {timeout}s; see {self.log_path}")

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by this server and its live descendants, all threads (Linux /proc).

        CPU per request is a steadier cost measure than requests/s on a shared, noisy machine."""
        return sum(cpu for _, _, cpu in process_tree(self.proc.pid).values())

    def stop(self) -> None:
        tree = process_tree(self.proc.pid) if self.proc.poll() is None else {}
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        alive = _proc_stats()
        for pid, (_, started, _) in tree.items():  # stragglers, also outside the group; same start time = same process
            if pid in alive and alive[pid][1] == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()


def _proc_stats() -> dict[int, tuple[int, int, float]]:
    """pid -> (ppid, start time, user+system CPU seconds) for every live process (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            f = stat.read_text().rsplit(")", 1)[1].split()  # after the command: state ppid pgrp ... utime stime
            stats[int(stat.parent.name)] = (int(f[1]), int(f[19]), (int(f[11]) + int(f[12])) / tick)
    return stats


def process_tree(pid: int) -> dict[int, tuple[int, int, float]]:
    """`pid` and all its descendants (even those that left its process group, as BentoML's workers do)."""
    stats = _proc_stats()
    children: dict[int, list[int]] = {}
    for p, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(p)
    tree, todo = {}, [pid]
    while todo:
        p = todo.pop()
        if p in stats and p not in tree:
            tree[p] = stats[p]
            todo.extend(children.get(p, []))
    return tree


@contextlib.contextmanager
def running(procs: list[Proc]) -> Iterator[list[Proc]]:
    """Stop every process in `procs` on the way out (the list may grow inside the block)."""
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


# ---- load generator ------------------------------------------------------------------------------
_WRK_LUA = """
wrk.method = "{method}"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("JSON {{\\"requests\\": %d, \\"duration_us\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d, "
    .. "\\"mean_us\\": %d, \\"errors\\": %d}}\\n", summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), latency.mean, e.connect + e.read + e.write + e.timeout + e.status))
end
"""


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        sys.exit("this benchmark drives load with wrk; install it with `apt-get install -y wrk` (Debian/Ubuntu)")
    return path


def wrk(url: str, body: Any, *, connections: int, seconds: float, threads: int = 1, cpus: str | None = None,
        method: str = "POST", timeout_s: float = 10, headers: dict[str, str] | None = None) -> dict[str, float]:
    """Closed-loop load with wrk: `connections` keep-alive connections each sending `body` (JSON) back to back
    for `seconds` (whole seconds).

    Returns rps, p50_ms, p99_ms, mean_ms, requests and errors (connect/read/write/timeout/non-2xx)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        extra = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items())
        f.write(_WRK_LUA.format(method=method, body=json.dumps(body), headers=extra))
    try:
        cmd = pinned([require_wrk(), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                      f"--timeout={max(1, round(timeout_s))}s", "-s", f.name, url], cpus)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    finally:
        os.unlink(f.name)
    m = re.search(r"^JSON (\{.*\})$", out.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout}\n{out.stderr}")
    r = json.loads(m.group(1))
    return {"rps": r["requests"] / (r["duration_us"] / 1e6), "p50_ms": r["p50_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "mean_ms": r["mean_us"] / 1000, "requests": r["requests"],
            "errors": r["errors"]}


# ---- results -------------------------------------------------------------------------------------
def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
    """Per-round ratios (rounds are interleaved): median, min, max; and the ratio of the medians."""
    return {**summarize([a / b for a, b in zip(num, den, strict=True)]),
            "of_medians": summarize(num)["median"] / summarize(den)["median"]}


def print_ratios(ratios: dict[str, Any], aim: dict[str, bool]) -> None:
    """The ratios (all but "aim") as a markdown table, then whether each aim was met."""
    print("\n| ratio | median | min | max | of medians |\n|---|---:|---:|---:|---:|")
    for k, v in ratios.items():
        if k != "aim":
            print(f"| {k} | {v['median']:.3f} | {v['min']:.3f} | {v['max']:.3f} | {v['of_medians']:.3f} |")
    print()
    for k, ok in aim.items():
        print(f"aim {k}: {'yes' if ok else 'NO'}")


def write_results(name: str, params: dict[str, Any], rows: list[dict[str, Any]], ratios: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    doc = {"name": name, "date": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit(),
           "machine": machine(), "params": params, "rows": rows, "ratios": ratios}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    """Rows as a markdown table: median (min–max)."""
    print("| system | metric | median | min | max | unit |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['system']} | {r['metric']} | {r['median']:.4g} | {r['min']:.4g} | {r['max']:.4g} | {r['unit']} |")


def deploy_ready(url: str, home: Path, package: Path, name: str, log: Path,
                 timeout: float = 180) -> tuple[str, list[dict[str, Any]]]:
    """On a started platform: its admin key (from `home`), `package` deployed as `name`, and its ready replicas
    (dicts of the deployments API) once there is one; RuntimeError naming `log` when none is ready in `timeout` s."""
    key = json.loads((home / "credentials.json").read_text())["api_key"]
    api = httpx.Client(base_url=url + "/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    api.post("/deployments", json={"path": str(package), "name": name}).raise_for_status()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reps = [x for x in api.get(f"/deployments/{name}").json()["replicas"] if x["state"] == "ready"]
        if reps:
            return key, reps
        time.sleep(0.2)
    raise RuntimeError(f"the {name} replica did not become ready; see {log}")
