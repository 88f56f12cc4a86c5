"""The map in docs/architecture.md holds: import rules (import-linter), lint (ruff), types (mypy), module size."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MYPY_KEY

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def _run(*args: str, timeout: float = 600) -> None:
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def test_import_rules_hold() -> None:
    _run(_tool("lint-imports"), "--no-cache")


def test_ruff_is_clean() -> None:
    _run(_tool("ruff"), "check", "ballast", "tests", "bench")


def test_types_check(request: pytest.FixtureRequest) -> None:
    started = request.config.stash.get(MYPY_KEY, None)  # started at collection, at low priority (conftest)
    if started is None:
        _run(sys.executable, "-m", "mypy", "ballast")
        return
    proc, out = started
    proc.wait(600)
    out.seek(0)
    text = out.read()
    assert proc.returncode == 0, text[-6000:]


def test_every_module_is_under_400_lines() -> None:
    long = {str(p.relative_to(REPO)): n for p in (REPO / "ballast").rglob("*.py")
            if (n := len(p.read_text().splitlines())) >= 400}
    assert not long, f"split these modules (one concept each, under 400 lines): {long}"
