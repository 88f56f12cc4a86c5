"""`ballast cache`: sizes of what lies under BALLAST_HOME, and cleaning that never breaks a platform."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.control.platform import Platform


def _ballast(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BALLAST_HOME": str(home)}
    env.pop("BALLAST_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "ballast.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def _fill(home: Path) -> None:
    for cat, name, size in (("models", "m", 2_000_000), ("envs", "0123abcd", 1000), ("packages", "f" * 64, 10),
                            ("logs", "echo", 5)):
        (home / cat / name).mkdir(parents=True)
        (home / cat / name / "file").write_bytes(b"x" * size)


def test_list_then_clean_one_kind_then_all(tmp_path: Path) -> None:
    _fill(tmp_path)
    listed = json.loads(_ballast(tmp_path, "cache", "list", "--json").stdout)
    sizes = {(e["category"], e["name"]): e["bytes"] for e in listed["entries"]}
    assert sizes[("models", "m")] == 2_000_000 and len(sizes) == 4
    table = _ballast(tmp_path, "cache", "list").stdout
    assert "1.9 MiB" in table and str(tmp_path) in table

    r = _ballast(tmp_path, "cache", "clean", "--models")
    assert r.returncode == 1 and "--yes" in r.stderr  # no terminal to ask: refuses
    assert (tmp_path / "models" / "m").exists()
    r = _ballast(tmp_path, "cache", "clean", "--models", "--yes")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "models" / "m").exists() and (tmp_path / "envs" / "0123abcd").exists()
    assert _ballast(tmp_path, "cache", "clean", "-y").returncode == 0
    assert json.loads(_ballast(tmp_path, "cache", "list", "--json").stdout)["entries"] == []


def test_packages_of_a_stopped_platform_are_kept(tmp_path: Path) -> None:
    _fill(tmp_path)
    (tmp_path / "credentials.json").write_text(json.dumps({"url": "http://127.0.0.1:1", "api_key": "bk_x"}))
    r = _ballast(tmp_path, "cache", "clean", "-y")
    assert r.returncode == 1 and "ballast up" in r.stderr
    assert (tmp_path / "packages" / ("f" * 64)).exists() and (tmp_path / "models" / "m").exists()
    assert _ballast(tmp_path, "cache", "clean", "--envs", "--logs", "-y").returncode == 0
    assert (tmp_path / "packages" / ("f" * 64)).exists()
    assert (tmp_path / "credentials.json").exists()


def test_a_running_platform_keeps_what_it_uses(cli_platform: Platform) -> None:
    home = cli_platform.home
    r = _ballast(home, "cache", "clean", "--envs", "-y")
    assert r.returncode == 1 and "running" in r.stderr
    used = {p.name for p in (home / "packages").iterdir()}
    assert used
    (home / "packages" / ("0" * 64)).mkdir()
    r = _ballast(home, "cache", "clean", "--packages", "-y")
    assert r.returncode == 0, r.stderr
    assert "0" * 64 in r.stdout
    assert {p.name for p in (home / "packages").iterdir()} == used
    assert cli_platform.show("echo")["replicas"][0]["state"] == "ready"
