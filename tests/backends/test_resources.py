"""Placement by `resources`: what fits a machine, GPUs counted per replica, the reason when not."""

from __future__ import annotations

from pathlib import Path

from ballast.backends import LocalBackend, ReplicaSpec
from ballast.backends.resources import Capacity, machine_capacity, place
from ballast.config import ResourcesConfig

TWO_H100 = Capacity(cpu=8, memory_bytes=64 * 2**30, gpus=("NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"))


def test_gpus_are_matched_by_name_and_counted() -> None:
    assert place(ResourcesConfig(accelerator="H100:2"), TWO_H100, set(), "local") == ([0, 1], None)
    assert place(ResourcesConfig(accelerator="gpu"), TWO_H100, {0}, "local") == ([1], None)
    _, why = place(ResourcesConfig(accelerator="H100:1"), TWO_H100, {0, 1}, "local")
    assert why == "no pool has 1 x H100 free (local has 2, 2 in use)"
    _, why = place(ResourcesConfig(accelerator="A100"), TWO_H100, set(), "local")
    assert why is not None and why.startswith("no pool has 1 x A100 free")


def test_cpu_and_memory_beyond_the_machine() -> None:
    assert place(ResourcesConfig(cpu=4, memory="8Gi"), TWO_H100, set(), "local") == ([], None)
    assert "16 CPUs" in (place(ResourcesConfig(cpu=16), TWO_H100, set(), "local")[1] or "")
    assert "1Ti of memory" in (place(ResourcesConfig(memory="1Ti"), TWO_H100, set(), "local")[1] or "")


def test_local_backend_reports_what_this_machine_lacks(tmp_path: Path) -> None:
    backend = LocalBackend("test", logs_dir=tmp_path)
    spec = ReplicaSpec("r-1", "svc", 1, tmp_path, resources=ResourcesConfig(cpu=machine_capacity(False).cpu + 1))
    assert "CPUs" in (backend.fits(spec) or "")
    assert backend.fits(ReplicaSpec("r-2", "svc", 1, tmp_path)) is None
