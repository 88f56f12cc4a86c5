"""A Ray cluster as a second capacity pool of a local platform: replicas placed there serve through the
gateway; draining the pool moves them to the local pool without a failed request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXAMPLES
from tests.control.platform import Platform, kill_leftovers, pid_alive
from tests.platform.test_pools import Load

pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def _ready(p: Platform, name: str) -> list[dict[str, Any]]:
    return [r for r in p.show(name)["replicas"] if r["state"] == "ready"]


def test_ray_pool_serves_and_drains_to_local(ray_cluster: str, tmp_path: Path) -> None:
    p = Platform(tmp_path / "home").start()
    pids: list[int] = []
    try:
        assert "pool ray1 added (ray at" in p.cli("pools", "add", "ray1", "--ray", ray_cluster).stdout
        p.wait("ray1 healthy", lambda: {x["name"]: x for x in p.api("GET", "/pools")["data"]}["ray1"]["healthy"],
               timeout=120)
        pkg = tmp_path / "echo"
        pkg.mkdir()
        for f in (EXAMPLES / "echo").iterdir():
            if f.is_file():
                (pkg / f.name).write_bytes(f.read_bytes())
        (pkg / "ballast.yaml").write_text((pkg / "ballast.yaml").read_text() + "\nplacement: {pools: [ray1, local]}\n")
        p.cli("deploy", str(pkg), "--name", "echo", "--wait", "--timeout", "180", timeout=240)
        (rep,) = p.wait("a ready replica on Ray", lambda: _ready(p, "echo"), timeout=60)
        assert rep["pool"] == "ray1"
        pids.append(rep["pid"])
        load = Load(p, "echo")
        load.start()
        try:
            p.wait("traffic", lambda: load.sent >= 10, timeout=60)
            p.cli("pools", "drain", "ray1")
            moved = p.wait("moved to local", lambda: (lambda r: r if len(r) == 1 and r[0]["pool"] == "local" and
                                                      len(p.show("echo")["replicas"]) == 1 else None)(
                _ready(p, "echo")), timeout=120)
            pids.append(moved[0]["pid"])
            sent = load.sent
            p.wait("traffic after the drain", lambda: load.sent >= sent + 10, timeout=60)
        finally:
            load.finish()
        assert load.errors == [], load.errors[:5]
        p.api("DELETE", "/deployments/echo")
    finally:
        p.stop()
        kill_leftovers([pid for pid in pids if pid and pid_alive(pid)])
