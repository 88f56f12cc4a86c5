"""Named profiles: add/list/use/remove, a 0600 file, and `--profile` / BALLAST_PROFILE on any command."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.control.platform import Platform


def _ballast(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("BALLAST_URL", "BALLAST_API_KEY", "BALLAST_PROFILE")}
    return subprocess.run([sys.executable, "-m", "ballast.cli.main", *args], capture_output=True, text=True,
                          env={**clean, "BALLAST_HOME": str(home), "COLUMNS": "250", **(env or {})}, timeout=60)


def test_profiles_reach_a_platform_by_name(tmp_path: Path) -> None:
    plat = Platform(tmp_path / "platform").start()
    try:
        home = tmp_path / "client"  # another machine: no credentials.json of its own
        assert _ballast(home, "deployments").returncode != 0  # nothing at the default URL with a key
        r = _ballast(home, "profiles", "add", "team", "--url", plat.url, "--api-key", plat.key or "")
        assert r.returncode == 0, r.stderr
        path = home / "profiles.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert json.loads(path.read_text())["profiles"]["team"]["url"] == plat.url
        r = _ballast(home, "profiles", "add", "other", "--url", "http://127.0.0.1:9", "--api-key", "bk_other")
        assert r.returncode == 0

        # --profile before or after the command, or BALLAST_PROFILE: the profile's URL and key are used.
        for args, env in ((("--profile", "team", "deployments"), None), (("deployments", "--profile=team"), None),
                          (("deployments",), {"BALLAST_PROFILE": "team"})):
            r = _ballast(home, *args, env=env)
            assert r.returncode == 0, (args, r.stderr)
        r = _ballast(home, "deployments", "--profile", "missing")
        assert r.returncode == 1 and "unknown profile 'missing'" in r.stderr

        # `use` makes one current; list marks it; remove falls back to the default.
        assert _ballast(home, "profiles", "use", "team").returncode == 0
        assert _ballast(home, "deployments").returncode == 0
        listed = json.loads(_ballast(home, "profiles", "list", "--json").stdout)
        assert {p["name"]: p["current"] for p in listed} == {"other": False, "team": True}
        assert all("bk_" not in str(p) for p in listed)  # keys are never printed
        r = _ballast(home, "deployments", "--profile", "other")
        assert r.returncode == 1 and "cannot reach" in r.stderr
        assert _ballast(home, "profiles", "remove", "team").returncode == 0
        assert "team" not in _ballast(home, "profiles", "list").stdout
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        plat.stop()
