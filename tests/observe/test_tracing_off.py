"""Tracing off (no OTEL_EXPORTER_OTLP_ENDPOINT): no OpenTelemetry module is even imported while a replica app is
built and serves real requests (the platform's modules load no SDK either), and no trace id reaches a log line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import write_package

SCRIPT = r"""
import logging, sys, time
from starlette.testclient import TestClient
from ballast.observe import configure_logging
from ballast.observe.tracing import get_tracer, tracing_enabled
from ballast.package import load_package
from ballast.runtime.model import ModelHost
from ballast.runtime.server import ReplicaApp

configure_logging()
assert not tracing_enabled() and get_tracer("x") is None
pkg = load_package(sys.argv[1])
app = ReplicaApp(ModelHost(pkg), pkg.config.runtime)
with TestClient(app.app) as client:
    for _ in range(600):  # the model loads in the background after start-up: wait until the replica is ready
        if client.get("/health/ready").status_code == 200:
            break
        time.sleep(0.05)
    for i in range(3):
        r = client.post("/predict", json={"i": i}, headers={"x-request-id": f"off-{i}",
                        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
        assert r.status_code == 200, r.text
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
print("LOADED", loaded)
assert not loaded, loaded
# The platform side builds no SDK either (a dependency, Ray, imports the bare OpenTelemetry API itself).
from ballast.platform.app import create_app
sdk = sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter")))
assert not sdk, sdk
"""

MODEL = """
import logging


class Model:
    def predict(self, inputs):
        logging.getLogger("user.model").info("predicting %s", inputs)
        return inputs
"""


def test_no_opentelemetry_import_and_no_trace_ids_when_off(tmp_path: Path) -> None:
    pkg = write_package(tmp_path / "echo", "name: echo\n", MODEL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(pkg)], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "LOADED []" in p.stdout
    lines = [ln for ln in p.stderr.splitlines() if "predicting" in ln]
    assert len(lines) == 3 and all("[off-" in ln and "trace=" not in ln for ln in lines), p.stderr


def test_a_set_endpoint_turns_it_on(tmp_path: Path) -> None:
    """The same script fails its first check once the variable is set: the switch is the variable."""
    pkg = write_package(tmp_path / "echo", "name: echo\n", MODEL)
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(pkg)], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "AssertionError" in p.stderr
