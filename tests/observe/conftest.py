"""A real platform with tracing on, shared by this directory's tests: `ballast up` with OTEL_EXPORTER_OTLP_ENDPOINT
pointing at a loopback OTLP receiver, a tiny Llama on the native engine, and a Python model that logs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import write_package
from tests.control.platform import Platform, kill_leftovers
from tests.observe.otlp_receiver import OTLPReceiver

LOGGING_MODEL = """
import logging

log = logging.getLogger("user.model")


class Model:
    def predict(self, inputs):
        log.info("predicting %s", inputs)
        return {"echo": inputs}
"""


@pytest.fixture(scope="package")
def receiver():
    r = OTLPReceiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="package")
def plat(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, receiver: OTLPReceiver):
    root = tmp_path_factory.mktemp("trace")
    p = Platform(root / "home")
    p.env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"})
    p.start()
    try:
        chat = write_package(root / "chat", f"""
            name: chat
            engine:
              kind: native
              checkpoint: {tiny_checkpoint}
              max_model_len: 256
              max_num_seqs: 4
              kv_cache_memory: 16Mi
            """)
        echo = write_package(root / "echo", "name: echo\n", LOGGING_MODEL)
        for pkg in (chat, echo):
            p.api("POST", "/deployments", expect=201, json={"path": str(pkg)})
        for name in ("chat", "echo"):
            p.wait_serving(name, 1, timeout=180)
        yield p
    finally:
        pids = p.replica_pids() if p.proc and p.proc.poll() is None else []
        p.stop()
        kill_leftovers(pids)


