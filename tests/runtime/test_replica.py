"""The replica runtime end to end: real `ballast serve` processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import EXAMPLES, write_package


def _error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in r.text
    assert r.headers.get("x-request-id")
    return body["error"]


@pytest.fixture
def echo(replica_factory):
    return replica_factory(EXAMPLES / "echo")


def test_echo_predict_and_request_ids(echo):
    r = httpx.post(echo.url + "/predict", json={"text": "hi", "n": [1, 2]})
    assert r.status_code == 200
    assert r.json() == {"echo": {"text": "hi", "n": [1, 2]}}
    generated = r.headers["x-request-id"]
    assert len(generated) >= 16
    r2 = httpx.post(echo.url + "/predict", json=1, headers={"x-request-id": "my-req-42"})
    assert r2.headers["x-request-id"] == "my-req-42"
    assert r2.json() == {"echo": 1}


def test_health_and_metrics(echo):
    assert httpx.get(echo.url + "/health").status_code == 200  # as vLLM answers it: load balancers probe it
    assert httpx.get(echo.url + "/health/live").json()["status"] == "alive"
    assert httpx.get(echo.url + "/health/ready").json()["status"] == "ready"
    for _ in range(3):
        httpx.post(echo.url + "/predict", json={})
    httpx.post(echo.url + "/predict", content=b"{nope")
    text = httpx.get(echo.url + "/metrics").text
    assert 'ballast_requests_total{method="POST",route="/predict",status="200"} 3.0' in text
    assert 'ballast_requests_total{method="POST",route="/predict",status="400"} 1.0' in text
    assert "ballast_request_duration_seconds_bucket" in text
    assert "ballast_time_to_first_byte_seconds_bucket" in text
    assert "ballast_requests_in_flight 0.0" in text
    assert "ballast_requests_queued 0.0" in text
    assert "ballast_model_ready 1.0" in text


def test_bad_json_unknown_route_and_method(echo):
    e = _error(httpx.post(echo.url + "/predict", content=b"{not json"))
    assert e["code"] == "invalid_json" and e["type"] == "invalid_request_error"
    r = httpx.get(echo.url + "/nope")
    assert r.status_code == 404 and _error(r)["type"] == "not_found_error"
    r = httpx.get(echo.url + "/predict")
    assert r.status_code == 405 and _error(r)["code"] == "method_not_allowed"
    assert r.headers["allow"] == "POST"
    # Documents that json.loads takes but that would break later: 5,000 levels deep, lone surrogates.
    for body in (b"[" * 5000 + b"]" * 5000, b'{"a": {"b": ["\\ud800"]}}', b'"\\udfff"'):
        r = httpx.post(echo.url + "/predict", content=body)
        assert r.status_code == 400 and _error(r)["code"] == "invalid_json", body[:40]
    # A surrogate pair is one valid character, and 100 levels are fine.
    assert httpx.post(echo.url + "/predict", content=b'"\\ud83d\\ude00"').json() == {"echo": "\U0001f600"}
    assert httpx.post(echo.url + "/predict", content=b"[" * 100 + b"]" * 100).status_code == 200
    # A model without OpenAI methods does not serve /v1 routes.
    r = httpx.post(echo.url + "/v1/chat/completions", json={})
    assert r.status_code == 404


def test_streaming_sse_ndjson_and_cli(replica_factory):
    rep = replica_factory(EXAMPLES / "stream")
    with httpx.stream("POST", rep.url + "/predict", json={"text": "a b c", "delay": 0.01}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert events == [{"index": 0, "token": "a"}, {"index": 1, "token": "b"}, {"index": 2, "token": "c"}]
    with httpx.stream(
        "POST", rep.url + "/predict", json={"text": "x y"}, headers={"accept": "application/x-ndjson"}
    ) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert [x["token"] for x in lines] == ["x", "y"]
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "ballast.cli.main", "predict", rep.url, "--data", '{"text": "p q"}'],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert [json.loads(x)["token"] for x in out.stdout.split("\n") if x.strip()] == ["p", "q"]


MODEL_KINDS = """
import asyncio, time

class Model:
    def __init__(self, config, data_dir, secrets):
        self.name = config.name
        self.data = (data_dir / "greeting.txt").read_text().strip()
        self.secret = secrets["API_TOKEN"]

    def preprocess(self, inputs):
        return {**inputs, "pre": True}

    def predict(self, inputs):
        if inputs.get("mode") == "gen":
            return self._gen(inputs)
        if inputs.get("mode") == "raise":
            raise RuntimeError("secret internal detail")
        if inputs.get("mode") == "sleep":
            time.sleep(float(inputs["s"]))
        return {"inputs": inputs, "name": self.name, "data": self.data, "secret": self.secret}

    def _gen(self, inputs):
        for i in range(3):
            yield {"i": i}

    def postprocess(self, result):
        return {**result, "post": True}
"""


def test_sync_generator_pre_post_and_init_arguments(tmp_path, replica_factory):
    pkg = write_package(
        tmp_path / "kinds",
        """
        name: kinds
        secrets: [API_TOKEN]
        environment_variables: {KINDS_FLAG: "on"}
        runtime: {predict_concurrency: 2, request_timeout_s: 2}
        """,
        MODEL_KINDS,
    )
    (pkg / "data").mkdir()
    (pkg / "data" / "greeting.txt").write_text("hello data\n")
    rep = replica_factory(pkg, env={"API_TOKEN": "s3cret"})
    r = httpx.post(rep.url + "/predict", json={"x": 1}).json()
    assert r == {"inputs": {"x": 1, "pre": True}, "name": "kinds", "data": "hello data", "secret": "s3cret",
                 "post": True}
    with httpx.stream("POST", rep.url + "/predict", json={"mode": "gen"}) as s:
        events = [json.loads(x[5:]) for x in s.iter_lines() if x.startswith("data:")]
    assert events == [{"i": 0}, {"i": 1}, {"i": 2}]
    # An exception in user code: 500 naming the request id, no trace to the client, trace in the log.
    r = httpx.post(rep.url + "/predict", json={"mode": "raise"}, headers={"x-request-id": "req-boom"})
    assert r.status_code == 500
    err = _error(r)
    assert "req-boom" in err["message"] and "secret internal detail" not in err["message"]
    time.sleep(0.2)
    log = rep.output()
    assert "[req-boom]" in log and "Traceback" in log and "secret internal detail" in log
    # request_timeout_s gives 504.
    r = httpx.post(rep.url + "/predict", json={"mode": "sleep", "s": 3}, timeout=30)
    assert r.status_code == 504 and _error(r)["code"] == "timeout"


SLOW = """
import asyncio

class Model:
    async def predict(self, inputs):
        await asyncio.sleep(float(inputs.get("s", 1)))
        return {"slept": inputs.get("s", 1)}
"""


def test_queue_full_gives_429_and_body_limit_413(tmp_path, replica_factory):
    pkg = write_package(
        tmp_path / "slow",
        "name: slow\nruntime: {predict_concurrency: 1, max_queue: 1, max_request_bytes: 1000}\n",
        SLOW,
    )
    rep = replica_factory(pkg)
    results: list[httpx.Response] = []

    def call() -> None:
        results.append(httpx.post(rep.url + "/predict", json={"s": 1.5}, timeout=30))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.3)  # one running, one queued
    r = httpx.post(rep.url + "/predict", json={"s": 0}, timeout=30)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1"
    assert _error(r)["type"] == "rate_limit_error"
    for t in threads:
        t.join()
    assert sorted(x.status_code for x in results) == [200, 200]
    big = httpx.post(rep.url + "/predict", json={"pad": "x" * 2000})
    assert big.status_code == 413 and _error(big)["code"] == "request_too_large"

    def chunks():
        for _ in range(5):
            yield b" " * 400

    chunked = httpx.post(rep.url + "/predict", content=chunks())
    assert chunked.status_code == 413
    assert httpx.post(rep.url + "/predict", json={"s": 0}).status_code == 200


def test_readiness_during_slow_load_and_after_failure(tmp_path, replica_factory):
    gate = tmp_path / "gate"
    slow = write_package(
        tmp_path / "slowload",
        "name: slowload\n",
        f"""
        import time, pathlib

        class Model:
            def load(self):
                while not pathlib.Path({str(gate)!r}).exists():
                    time.sleep(0.05)

            def predict(self, inputs):
                return "ok"
        """,
    )
    rep = replica_factory(slow, ready=False)
    rep.wait_listening()
    r = httpx.get(rep.url + "/health/ready")
    assert r.status_code == 503 and r.json()["reason"] == "loading"
    assert httpx.get(rep.url + "/health/live").status_code == 200
    p = httpx.post(rep.url + "/predict", json={})
    assert p.status_code == 503 and _error(p)["code"] == "model_loading" and p.headers["retry-after"]
    gate.write_text("go")
    rep.wait_ready(30)
    assert httpx.post(rep.url + "/predict", json={}).json() == "ok"

    bad = write_package(
        tmp_path / "badload",
        "name: badload\n",
        """
        class Model:
            def load(self):
                raise ValueError("weights are missing")

            def predict(self, inputs):
                return "never"
        """,
    )
    rep2 = replica_factory(bad, ready=False)
    rep2.wait_listening()
    deadline = time.monotonic() + 30
    while httpx.get(rep2.url + "/health/ready").json()["reason"] == "loading" and time.monotonic() < deadline:
        time.sleep(0.05)
    r = httpx.get(rep2.url + "/health/ready")
    assert r.status_code == 503 and "weights are missing" in r.json()["reason"]
    assert httpx.get(rep2.url + "/health/live").status_code == 503
    p = httpx.post(rep2.url + "/predict", json={})
    assert p.status_code == 503 and _error(p)["code"] == "model_load_failed"


def test_sigterm_finishes_in_flight_request(tmp_path, replica_factory):
    pkg = write_package(tmp_path / "drain", "name: drain\nruntime: {shutdown_grace_s: 20}\n", SLOW)
    rep = replica_factory(pkg)
    result: dict = {}

    def call() -> None:
        result["r"] = httpx.post(rep.url + "/predict", json={"s": 2}, timeout=30)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.5)
    os.killpg(rep.proc.pid, signal.SIGTERM)
    t.join(30)
    assert result["r"].status_code == 200 and result["r"].json() == {"slept": 2}
    assert rep.proc.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.post(rep.url + "/predict", json={"s": 0})
    assert "shutting down" in rep.output()


def test_config_error_is_one_clear_line(tmp_path):
    import subprocess
    import sys

    pkg = write_package(tmp_path / "bad", "name: bad\nruntime: {predict_concurency: 2}\n", "class Model: pass\n")
    out = subprocess.run(
        [sys.executable, "-m", "ballast.cli.main", "serve", str(pkg)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "ballast.yaml" in out.stderr and "runtime.predict_concurency" in out.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "ballast.cli.main", "serve", str(tmp_path / "nothing")],
        capture_output=True, text=True, timeout=60,
    )
    assert missing.returncode == 1 and "no such directory" in missing.stderr


def test_init_scaffold_serves_as_is(tmp_path, replica_factory):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "ballast.cli.main", "init", "hello", "--directory", str(tmp_path / "hello")],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rep = replica_factory(tmp_path / "hello")
    assert httpx.post(rep.url + "/predict", json={"text": "abc"}).json() == {"text": "abc", "length": 3}


@pytest.mark.slow
def test_requirements_get_an_isolated_cached_environment(tmp_path, tmp_home: Path, replica_factory):
    """`requirements` are installed into a venv keyed by their hash, layered over Ballast's environment."""
    pkg = write_package(
        tmp_path / "iso",
        "name: iso\nrequirements: ['six==1.16.0']\n",
        """
        import six, sys
        import ballast, torch  # from the parent environment: reused, not reinstalled

        class Model:
            def predict(self, inputs):
                return {"six": six.__version__, "six_file": six.__file__, "torch": torch.__file__}
        """,
    )
    rep = replica_factory(pkg, extra_args=[])
    body = httpx.post(rep.url + "/predict", json={}).json()
    assert body["six"] == "1.16.0"
    assert body["six_file"].startswith(str(tmp_home / "envs"))
    assert not body["torch"].startswith(str(tmp_home))  # reused from Ballast's environment
    envs = list((tmp_home / "envs").iterdir())
    rep.stop()
    rep2 = replica_factory(pkg, extra_args=[])
    assert httpx.post(rep2.url + "/predict", json={}).json()["six_file"] == body["six_file"]
    assert list((tmp_home / "envs").iterdir()) == envs  # reused, not rebuilt
