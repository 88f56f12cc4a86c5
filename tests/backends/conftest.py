"""Fixtures shared by the Ray backend tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.backends.ray_heads import RayHead


@pytest.fixture(scope="package")
def ray_cluster() -> Iterator[str]:
    """One local Ray head for this package's tests (its own ports and temp dir), stopped by killing exactly its
    processes once the package's last test ends: an idle cluster left up would tax every later test's CPU."""
    pytest.importorskip("ray")
    head = RayHead(num_cpus=2, memory_gib=8)
    try:
        yield head.start().address
    finally:
        head.close()
