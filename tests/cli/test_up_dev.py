"""`ballast up` and `ballast dev` in the foreground: what they print, and that they leave nothing behind."""

from __future__ import annotations

import logging
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from ballast.cli.up_cmds import EVENTS_LOGGER, configure_up_console
from tests.conftest import Running, free_port, write_package
from tests.control.platform import FAST_ENV, Platform, pid_alive

MODEL = "class Model:\n    def predict(self, x):\n        return {'dev': x}\n"


def test_up_prints_the_banner_and_no_info_noise(running: Callable[..., Running], tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, **FAST_ENV, "BALLAST_HOME": str(tmp_path)}
    env.pop("BALLAST_LOG_LEVEL", None)
    up = running(["up", "--port", str(port), "--no-isolation"], env)
    up.wait_for(rf"ballast platform: http://127.0.0.1:{port}/api/v1")
    up.wait_for(r"^  bk_")  # the admin key, shown once
    httpx.get(f"http://127.0.0.1:{port}/api/v1/health").raise_for_status()
    assert up.stop(signal.SIGINT) == 0
    out = up.output()
    assert "ballast platform stopped" in out
    assert " INFO " not in out, out  # uvicorn's start/stop chatter stays below WARNING


def test_up_console_shows_lifecycle_events_as_plain_lines(capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALLAST_LOG_LEVEL", raising=False)
    monkeypatch.delenv("BALLAST_LOG_FORMAT", raising=False)
    root, events = logging.getLogger(), logging.getLogger(EVENTS_LOGGER)
    saved = root.level, events.level, events.propagate, list(events.handlers)
    try:
        configure_up_console()
        events.info("echo: version 2 is ready (1 replica)")
        events.info("%s", "12:03:04 echo v2 replica r-1 ready")  # the control plane's lines carry their time
        logging.getLogger("ballast.platform").info("noise")
        out = capsys.readouterr().out
    finally:
        root.setLevel(saved[0])
        events.setLevel(saved[1])
        events.propagate = saved[2]
        events.handlers[:] = saved[3]
    first, second = out.splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d echo: version 2 is ready \(1 replica\)", first), out
    assert second == "12:03:04 echo v2 replica r-1 ready"


def test_dev_prints_the_url_and_sigterm_stops_the_replica(cli_platform: Platform, running: Callable[..., Running],
                                                          tmp_path: Path) -> None:
    pkg = write_package(tmp_path / "hack", "name: hack\n", MODEL)
    dev = running(["dev", str(pkg)], {**cli_platform.env, "BALLAST_URL": cli_platform.url})
    url = dev.wait_for(r"^ready: (http://127\.0\.0\.1:\d+) ").group(1)
    dev.wait_for(rf"{cli_platform.url}/deployments/hack/environments/\w+/predict")
    assert httpx.post(url + "/predict", json={"a": 1}).json() == {"dev": {"a": 1}}
    pids = [r["pid"] for r in cli_platform.show("hack")["replicas"] if r["pid"]]
    assert pids
    assert dev.stop(signal.SIGTERM) == 0
    assert "hack: development replica stopped" in dev.output()
    cli_platform.wait("the dev replica to stop", lambda: not any(pid_alive(p) for p in pids))
    r = cli_platform.api("GET", "/deployments/hack", expect=None)
    assert not isinstance(r, dict) or not [v for v in r.get("versions", []) if v["dev"]]
