"""`ballast serve`: the ready line with its URL, and request lines only with --access-log."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from tests.conftest import EXAMPLES, Replica


def test_access_log_only_when_asked(replica_factory: Callable[..., Replica]) -> None:
    quiet = replica_factory(EXAMPLES / "echo")
    loud = replica_factory(EXAMPLES / "echo", extra_args=["--no-isolation", "--access-log"])
    for rep in (quiet, loud):
        assert httpx.post(rep.url + "/predict", json={"a": 1}).status_code == 200
        assert f"ready: {rep.url}" in rep.output()
    deadline = time.monotonic() + 30
    while "POST /predict" not in loud.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "POST /predict" in loud.output()
    assert "POST /predict" not in quiet.output()
