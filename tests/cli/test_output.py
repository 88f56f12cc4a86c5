"""What people read: help without type noise on flags, a version flag, tables never cut when piped."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from rich.table import Table
from typer.testing import CliRunner

from ballast import __version__
from ballast.cli.main import app
from ballast.cli.options import make_console
from tests.control.platform import Platform


def _paths(cmd: object, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [path]
    for name, sub in getattr(cmd, "commands", {}).items():
        out += _paths(sub, (*path, name))
    return out


def test_no_help_labels_a_flag_bool() -> None:
    paths = _paths(typer.main.get_command(app))
    assert ("keys", "create") in paths and ("up",) in paths
    runner = CliRunner()
    for path in paths:
        r = runner.invoke(app, [*path, "--help"])
        assert r.exit_code == 0, (path, r.output)
        assert "--help" in r.output and "<bool>" not in r.output, (path, r.output)
    assert "~/.ballast" in runner.invoke(app, ["up", "--help"]).output


def test_version_flag_and_command() -> None:
    for args in (["--version"], ["version"]):
        r = subprocess.run([sys.executable, "-m", "ballast.cli.main", *args], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == f"ballast {__version__}", r


def test_piped_tables_are_not_cut_and_retiring_has_its_own_column(cli_platform: Platform) -> None:
    out = cli_platform.cli("show", "echo").stdout
    lines = [line.strip() for line in out.splitlines()]
    header = next(line for line in lines if line.startswith("VERSION"))
    assert header.split() == ["VERSION", "CREATED", "BY", "DESIRED", "READY", "SCALE", "COLD", "START", "PACKAGE",
                              "POOLS", "NOTE"]
    replica_header = next(line for line in lines if line.startswith("REPLICA"))
    assert replica_header.split()[-2:] == ["LAST", "ERROR"]
    assert "…" not in out
    fingerprint = cli_platform.show("echo")["versions"][0]["fingerprint"][:12]
    row = next(line for line in lines if line.startswith("v1 "))
    assert fingerprint in row and row.split()[-1] == "-"


def test_a_piped_console_never_wraps_or_cuts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    c = make_console()
    assert not c.is_terminal
    t = Table("NAME", "LAST ERROR", box=None)
    t.add_row("r-1", "x" * 300)
    with c.capture() as cap:
        c.print(t)
    assert "x" * 300 in cap.get()
