"""Replica logs, tailed and followed: `<logs_dir>/<deployment>/v<version>-<replica>.log` (+ rotated `.1`, `.2`)."""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

_NAME = re.compile(r"^v(\d+)-(.+)\.log$")


def log_files(logs_dir: Path, deployment: str, version: int | None = None) -> list[tuple[int, str, Path]]:
    """(version, replica id, path) of the current log file of every replica, oldest first (the default pool's
    replicas log under `logs_dir`, those of other pools under `logs_dir/_pools/<pool>`)."""
    pools = logs_dir / "_pools"  # no deployment name starts with "_"
    dirs = [logs_dir / deployment] + (sorted(p / deployment for p in pools.iterdir()) if pools.is_dir() else [])
    out = []
    for p in (p for d in dirs if d.is_dir() for p in d.iterdir()):
        m = _NAME.match(p.name)
        if m and (version is None or int(m.group(1)) == version):
            out.append((int(m.group(1)), m.group(2), p))
    return sorted(out, key=lambda t: (t[2].stat().st_mtime if t[2].exists() else 0, t[1]))


def tail_lines(logs_dir: Path, deployment: str, version: int | None = None, tail: int = 100) -> list[str]:
    lines: list[str] = []
    for v, rid, path in log_files(logs_dir, deployment, version):
        try:
            with open(path, errors="replace") as f:
                lines.extend(f"[v{v} {rid}] {line.rstrip()}" for line in deque(f, maxlen=tail))
        except OSError:
            continue
    return lines[-tail:] if tail else lines


async def follow(logs_dir: Path, deployment: str, version: int | None = None, tail: int = 100,
                 poll_s: float = 0.25) -> AsyncIterator[str]:
    """The last `tail` lines, then new lines of every replica (new replicas included) until cancelled."""
    for line in tail_lines(logs_dir, deployment, version, tail):
        yield line + "\n"
    offsets = _sizes(log_files(logs_dir, deployment, version))
    partial: dict[Path, bytes] = {}
    while True:
        await asyncio.sleep(poll_s)
        out: list[str] = []
        for v, rid, path in log_files(logs_dir, deployment, version):
            out.extend(f"[v{v} {rid}] {c.decode(errors='replace').rstrip()}\n"
                       for c in _new_lines(path, offsets, partial))
        for line in out:
            yield line


def _sizes(files: list[tuple[int, str, Path]]) -> dict[Path, int]:
    """The current size of each log file: where following starts."""
    offsets: dict[Path, int] = {}
    for _v, _rid, path in files:
        try:
            offsets[path] = path.stat().st_size
        except OSError:
            pass
    return offsets


def _new_lines(path: Path, offsets: dict[Path, int], partial: dict[Path, bytes]) -> list[bytes]:
    """The complete lines written to `path` since `offsets[path]`; an unfinished last line waits in `partial`."""
    try:
        size = path.stat().st_size
    except OSError:
        return []
    start = offsets.get(path, 0)
    if size < start:  # rotated (copy-truncate)
        start = 0
    if size == start:
        return []
    with open(path, "rb") as f:
        f.seek(start)
        data = partial.pop(path, b"") + f.read(size - start)
    offsets[path] = size
    *complete, rest = data.split(b"\n")
    if rest:
        partial[path] = rest
    return complete
