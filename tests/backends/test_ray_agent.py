"""Ray pools' agents without a cluster: what crosses the pipe survives the trip, and pools whose cluster does not
answer are each reported with their own reason, at once (a real agent process each; no second Ray pool is
refused for being a second one any more)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ballast.backends import LocalBackend, ReplicaHandle, ReplicaSpec, ReplicaStatus
from ballast.backends import ray_wire as wire
from ballast.backends.pools import PoolBackend
from ballast.config import ResourcesConfig
from tests.conftest import free_port

pytest.importorskip("ray")


def test_specs_handles_and_statuses_cross_the_pipe_unchanged(tmp_path: Path) -> None:
    spec = ReplicaSpec("r-1", "svc", 3, tmp_path / "pkg", {"A": "1"},
                       ResourcesConfig(cpu=0.5, memory="256Mi", accelerator="H100:2"), "ray-a")
    message = wire.decode(wire.encode({"id": 7, "op": "start", "args": {"spec": wire.spec_to(spec)}}))
    assert wire.spec_of(message["args"]["spec"]) == spec
    handle = ReplicaHandle("r-1", "http://127.0.0.1:9", 42, 9, "/x.log", "ray-a", {"actor": "ballast-i-r-1-abc"})
    assert wire.handle_of(wire.decode(wire.encode({"id": 1, "ok": wire.handle_to(handle)}))["ok"]) == handle
    status = ReplicaStatus(False, 3, "exited with code 3")
    assert wire.status_of(wire.decode(wire.encode({"id": 2, "ok": wire.status_to(status)}))["ok"]) == status
    for bad in (b"[]\n", b'{"op": "ping"}\n', b"not json\n"):
        with pytest.raises(ValueError):
            wire.decode(bad)


def test_two_ray_pools_without_clusters_are_each_down_with_their_reason(tmp_path: Path) -> None:
    pools = PoolBackend(LocalBackend("agents", logs_dir=tmp_path / "logs"))
    addresses = {name: f"127.0.0.1:{free_port()}" for name in ("ray-a", "ray-b")}
    pools.sync([("local", "local", None), *[(n, "ray", a) for n, a in addresses.items()]])  # the first waits
    assert set(pools.members) == {"local"}
    for name, address in addresses.items():
        why = pools.check(name) or ""
        assert f"cannot connect to {address}" in why and "no Ray cluster answers" in why, why
        assert "another Ray cluster" not in why
        spec = ReplicaSpec("r-x", "svc", 1, tmp_path, pool=name)
        assert pools.fits(spec) == why  # a replica placed there waits, pending with the same reason
    assert pools.check("local") is None
    assert (tmp_path / "logs" / "_pools" / "ray-a" / "ray-agent.log").exists()  # each agent's stderr, per pool
