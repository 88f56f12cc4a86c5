"""Isolated environments for package requirements, cached by a hash of the requirements.

Requirements are installed with pip into a prefix of their own (`$BALLAST_HOME/envs/<hash>`), by
Ballast's own interpreter, so anything already installed beside Ballast (torch, numpy, Ballast
itself) satisfies them and is reused rather than downloaded again, while what is missing or pinned
differently goes into the prefix. The replica runs with that prefix first on its path: the
package's requirements win, the rest comes from Ballast's environment. This works whether Ballast
runs in a virtual environment or in the system Python.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

from ballast.home import ballast_home


class EnvironmentError_(RuntimeError):
    """Installing a package's requirements failed; the message has the installer's error."""


def requirements_hash(requirements: list[str]) -> str:
    norm = "\n".join(sorted(r.strip() for r in requirements if r.strip()))
    key = f"{sys.version_info.major}.{sys.version_info.minor}\n{norm}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def site_dir(prefix: Path) -> Path:
    """Where pip --prefix puts pure and platform packages for this interpreter (the same on Linux)."""
    rel = Path(sysconfig.get_path("purelib")).relative_to(sysconfig.get_paths()["data"])
    return prefix / rel


def ensure_environment(
    requirements: list[str], *, log: Callable[[str], None] = lambda _m: None, timeout_s: float = 1800
) -> Path | None:
    """Install `requirements` once; returns the site-packages directory to put first on the path."""
    if not requirements:
        return None
    env_dir = ballast_home() / "envs" / requirements_hash(requirements)
    if (env_dir / ".ready").exists():
        return site_dir(env_dir)
    tmp = env_dir.with_name(env_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.monotonic()
    log(f"installing {len(requirements)} requirement(s)")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-warn-script-location", "--prefix", str(tmp), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise EnvironmentError_("installing requirements failed: " + " | ".join(tail))
    tmp.mkdir(exist_ok=True)
    (tmp / ".ready").write_text(f"{time.time()}\n")
    try:
        tmp.rename(env_dir)  # atomic: a half-built environment is never used
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; use its environment
    log(f"requirements ready in {time.monotonic() - started:.1f}s")
    return site_dir(env_dir)
