"""What a machine offers (CPU cores, memory, GPUs) and whether a replica's `resources` fit in it.

CPU and memory are checked per replica against the whole machine (replicas on one machine share
them, as processes do); accelerators are whole devices, counted per replica, so two replicas never
share a GPU. GPUs are found through torch.cuda, imported only when a replica asks for one.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from ballast.config import ResourcesConfig

GENERIC_ACCELERATORS = {"gpu", "cuda", "any"}


@dataclass(frozen=True)
class Capacity:
    cpu: float
    memory_bytes: int
    gpus: tuple[str, ...] = ()  # device names, by index


def machine_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@functools.cache
def detect_gpus() -> tuple[str, ...]:
    """Names of the CUDA devices torch sees (none without torch or a GPU)."""
    try:
        import torch
    except ImportError:
        return ()
    if not torch.cuda.is_available():
        return ()
    return tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))


def machine_capacity(with_gpus: bool) -> Capacity:
    cpu = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return Capacity(cpu, machine_memory_bytes(), detect_gpus() if with_gpus else ())


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}Gi"


def matches(kind: str, device_name: str) -> bool:
    """`H100` matches "NVIDIA H100 80GB HBM3"; `gpu` (or `cuda`) matches any device."""
    return kind.lower() in GENERIC_ACCELERATORS or kind.lower() in device_name.lower()


def place(req: ResourcesConfig, cap: Capacity, busy: set[int], pool: str) -> tuple[list[int], str | None]:
    """GPU indices for a replica, or the reason it cannot run in this pool (shown to the operator)."""
    if req.cpu > cap.cpu:
        return [], f"no pool has {req.cpu:g} CPUs ({pool} has {cap.cpu:g})"
    if req.memory_bytes > cap.memory_bytes:
        return [], f"no pool has {req.memory} of memory ({pool} has {_gib(cap.memory_bytes)})"
    if not req.accelerator:
        return [], None
    kind = req.accelerator.partition(":")[0]
    n = req.accelerator_count
    free = [i for i, name in enumerate(cap.gpus) if i not in busy and matches(kind, name)]
    if len(free) < n:
        have = sum(matches(kind, name) for name in cap.gpus)
        return [], f"no pool has {n} x {kind} free ({pool} has {have}, {have - len(free)} in use)"
    return free[:n], None
