"""The Ray backend against a real single-node Ray cluster: deploy, serve through the gateway, survive a
platform kill (re-adoption by actor name), keep an impossible GPU request pending with its reason."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import EXAMPLES, write_package
from tests.control.platform import Platform

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def _ready(p: Platform, name: str) -> dict | None:
    reps = [r for r in p.show(name)["replicas"] if r["state"] == "ready"]
    return reps[0] if reps else None


def _predict(p: Platform, body: object) -> httpx.Response:
    return httpx.post(p.url + "/deployments/echo/predict", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {p.key}"})


def test_ray_backend_deploy_serve_readopt_pending(ray_cluster: str, tmp_path: Path) -> None:
    args = ("--backend", "ray", "--ray-address", ray_cluster)
    home = tmp_path / "home"
    p = Platform(home, args=args).start(timeout=120)
    try:
        p.cli("deploy", str(EXAMPLES / "echo"), "--name", "echo", "--wait", "--timeout", "180", timeout=240)
        rep = p.wait("a ready Ray replica", lambda: _ready(p, "echo"), timeout=60)
        assert rep["pool"] == "ray"
        r = _predict(p, {"hello": "ray"})
        assert r.status_code == 200, r.text
        assert r.json() == {"echo": {"hello": "ray"}}
        # The replica listens on its node's address: without the platform's token it answers nothing but probes.
        direct = httpx.post(rep["url"] + "/predict", json={"hello": "ray"}, timeout=30)
        assert direct.status_code == 401 and direct.json()["error"]["code"] == "replica_token_required"
        assert httpx.get(rep["url"] + "/metrics", timeout=30).status_code == 401
        p.wait("replica log copied", lambda: "Ray actor" in p.cli("logs", "echo").stdout, timeout=30)

        # Kill the platform hard: the detached actor keeps serving; a new platform re-adopts it.
        p.kill()
        assert httpx.get(rep["url"] + "/health/ready", timeout=10).status_code == 200
        p = Platform(home, args=args, port=p.port).start(timeout=120)
        again = p.wait("re-adopted replica", lambda: _ready(p, "echo"), timeout=60)
        assert (again["id"], again["url"], again["pid"]) == (rep["id"], rep["url"], rep["pid"])
        assert _predict(p, [1, 2]).json() == {"echo": [1, 2]}
        events = p.api("GET", "/deployments/echo/events")["data"]
        assert sum(e["kind"] == "replica_started" for e in events) == 1  # never started twice

        # A GPU the cluster does not have: pending with the reason, never started.
        pkg = write_package(tmp_path / "gpu", 'name: needgpu\nresources: {accelerator: "H100:1"}\n',
                            "class Model:\n    def predict(self, x):\n        return x\n")
        p.cli("deploy", str(pkg))

        def pending(name: str) -> Callable[[], dict | None]:
            def check() -> dict | None:
                reps = p.show(name)["replicas"]
                return reps[0] if reps and reps[0]["state"] == "pending" else None
            return check

        gpu = p.wait("GPU replica pending", pending("needgpu"), timeout=60)
        assert "no node of the Ray cluster" in gpu["reason"] and "1 x H100" in gpu["reason"]
        assert gpu["url"] is None

        # Two CPUs exist but echo holds one: pending until they are free, not queued inside Ray.
        pkg = write_package(tmp_path / "big", "name: big\nresources: {cpu: 2}\n",
                            "class Model:\n    def predict(self, x):\n        return x\n")
        p.cli("deploy", str(pkg))
        big = p.wait("2-CPU replica pending", pending("big"), timeout=60)
        assert "has 2 CPUs free" in big["reason"], big["reason"]
    finally:
        p.stop()
    # A clean stop stops the actors too.
    with pytest.raises(httpx.HTTPError):
        httpx.get(rep["url"] + "/health/ready", timeout=5)
