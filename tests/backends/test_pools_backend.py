"""PoolBackend: several local pools behind one Backend; each replica is started, listed, inspected and
stopped by its own pool's backend (real `ballast serve` processes)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ballast.backends import LocalBackend, ReplicaSpec
from ballast.backends.pools import PoolBackend
from tests.conftest import write_package


def test_replicas_of_two_local_pools_are_told_apart(tmp_path: Path) -> None:
    instance = "pools-" + os.urandom(4).hex()
    pools = PoolBackend(LocalBackend(instance, logs_dir=tmp_path / "logs", extra_args=["--no-isolation"]))
    pools.sync([("local", "local", None), ("b", "local", None)])
    assert set(pools.members) == {"local", "b"} and pools.check("b") is None
    pkg = write_package(tmp_path / "pkg", "name: svc\n", "class Model:\n    def predict(self, x):\n        return x\n")
    assert pools.fits(ReplicaSpec("r-x", "svc", 1, pkg, pool="mars")) == "no usable pool for it (mars)"
    handles = [pools.start(ReplicaSpec(f"r-{p}", "svc", 1, pkg, pool=p)) for p in ("local", "b")]
    try:
        assert [h.pool for h in handles] == ["local", "b"]
        assert Path(handles[1].log_path or "").parent == tmp_path / "logs" / "_pools" / "b" / "svc"
        listed = {h.replica_id: h.pool for h in pools.list()}
        assert listed == {"r-local": "local", "r-b": "b"}  # each process listed once, by its own pool
        assert [h.replica_id for h in pools.members["local"].list()] == ["r-local"]
        assert all(pools.inspect(h).alive for h in handles)
    finally:
        for h in handles:
            pools.stop(h, 5.0)
    deadline = time.monotonic() + 10
    while pools.list() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pools.list() == []
    pools.sync([("local", "local", None)])  # b was removed
    assert set(pools.members) == {"local"}
    assert not pools.inspect(handles[1]).alive
