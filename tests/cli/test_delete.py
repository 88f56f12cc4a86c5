"""`ballast delete` says what will go and asks; without a terminal it needs --yes."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import write_package
from tests.control.platform import Platform

MODEL = "class Model:\n    def predict(self, x):\n        return x\n"


def test_delete_refuses_without_a_terminal_then_deletes_with_yes(cli_platform: Platform, tmp_path: Path) -> None:
    pkg = write_package(tmp_path / "doomed", "name: doomed\n", MODEL)
    cli_platform.api("POST", "/deployments", expect=201, json={"path": str(pkg)})
    r = cli_platform.cli("delete", "doomed", check=False)
    assert r.returncode == 1
    assert "--yes" in r.stderr
    assert "environments: production (v1" in r.stdout and "versions: v1" in r.stdout
    assert cli_platform.show("doomed")["name"] == "doomed"  # nothing went
    r = cli_platform.cli("delete", "doomed", "-y")
    assert "doomed: deleted" in r.stdout
    cli_platform.api("GET", "/deployments/doomed", expect=404)
