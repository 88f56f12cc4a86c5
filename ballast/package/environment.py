"""Isolated virtual environments for package requirements, cached by a hash of the requirements.

An environment layers on top of the environment Ballast runs in (a `.pth` file adds the parent's
site-packages after its own), so heavy packages already installed (torch, Ballast itself) are reused
instead of downloaded again, while the requirements the package names take precedence. This works
whether Ballast itself runs in a virtual environment or in the system Python.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import site
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ballast.home import ballast_home


class EnvironmentError_(RuntimeError):
    """Creating or installing a package environment failed; the message has the installer's error."""


def requirements_hash(requirements: list[str]) -> str:
    norm = "\n".join(sorted(r.strip() for r in requirements if r.strip()))
    key = f"{sys.version_info.major}.{sys.version_info.minor}\n{norm}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _uv() -> list[str]:
    exe = shutil.which("uv")
    if exe:
        return [exe]
    try:
        from uv import find_uv_bin

        return [find_uv_bin()]
    except Exception as e:  # pragma: no cover - uv is a dependency
        raise EnvironmentError_("uv is not installed; `pip install uv` or run with --no-isolation") from e


def _link_parent(env_dir: Path) -> None:
    """Make the parent environment's packages importable after the environment's own."""
    parents = [p for p in (*site.getsitepackages(), site.getusersitepackages()) if Path(p).is_dir()]
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in parents)
    for sp in env_dir.glob("lib/python*/site-packages"):
        (sp / "zz_ballast_parent.pth").write_text(lines)


def ensure_environment(
    requirements: list[str], *, log: Callable[[str], None] = lambda _m: None, timeout_s: float = 1800
) -> Path:
    """Return the python executable of an environment with `requirements` installed (cached)."""
    if not requirements:
        return Path(sys.executable)
    env_dir = ballast_home() / "envs" / requirements_hash(requirements)
    python = env_dir / "bin" / "python"
    marker = env_dir / ".ready"
    if marker.exists() and python.exists():
        return python
    tmp = env_dir.with_name(env_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    uv = _uv()
    started = time.monotonic()
    log(f"creating environment for {len(requirements)} requirement(s)")
    steps = [
        [*uv, "venv", "--quiet", "--python", sys.executable, str(tmp)],
        [*uv, "pip", "install", "--quiet", "--python", str(tmp / "bin" / "python"), *requirements],
    ]
    for i, cmd in enumerate(steps):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise EnvironmentError_("installing requirements failed: " + " | ".join(tail))
        if i == 0:
            _link_parent(tmp)
    (tmp / ".ready").write_text(f"{time.time()}\n")
    try:
        tmp.rename(env_dir)  # atomic: a half-built environment is never used
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; use its environment
    log(f"environment ready in {time.monotonic() - started:.1f}s")
    return python
