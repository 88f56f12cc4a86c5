"""One real platform shared by the CLI tests (starting one is the slow part), with an echo deployment; it stops with
the package's last test, so later tests do not share the machine with it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import EXAMPLES
from tests.control.platform import Platform, kill_leftovers


@pytest.fixture(scope="package")
def cli_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    p = Platform(tmp_path_factory.mktemp("cli") / "home").start()
    try:
        p.api("POST", "/deployments", expect=201, json={"path": str(EXAMPLES / "echo")})
        p.wait_serving("echo", 1, timeout=120)
        yield p
    finally:
        pids = p.replica_pids() if p.proc and p.proc.poll() is None else []
        p.stop()
        kill_leftovers(pids)

