"""A replica given a token (as Ray replicas are) answers only callers that send it: probes stay open, everything
else is a 401 with an OpenAI-style body and a request id, and the model's own code never sees the token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ballast.observe import replica_auth
from ballast.observe.replica_auth import ENV, HEADER, headers_for, set_secret, token_for
from tests.conftest import Replica, write_package

MODEL = """
import os

class Model:
    def predict(self, inputs):
        return {"token_seen_by_model": os.environ.get("BALLAST_REPLICA_TOKEN"), "inputs": inputs}
"""
TOKEN = "t0ken-" + "x" * 58


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    pkg = write_package(tmp_path_factory.mktemp("tok") / "tok", "name: tok\n", MODEL)
    rep = Replica(pkg, env={ENV: TOKEN}, log_dir=tmp_path_factory.mktemp("tok-logs"))
    try:
        rep.wait_ready(120)  # the readiness probe needs no token
        yield rep
    finally:
        rep.stop()


def test_requests_without_the_token_are_refused(replica: Replica) -> None:
    for method, path in (("POST", "/predict"), ("GET", "/metrics"), ("GET", "/openapi.json"),
                         ("POST", "/v1/chat/completions"), ("GET", "/no-such-route")):
        r = httpx.request(method, replica.url + path, json={} if method == "POST" else None, timeout=30)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "replica_token_required" and r.headers["x-request-id"]
    wrong = httpx.post(replica.url + "/predict", json=1, headers={HEADER: TOKEN[:-1] + "y"}, timeout=30)
    assert wrong.status_code == 401


def test_probes_are_open_and_the_token_opens_the_rest(replica: Replica) -> None:
    for path in ("/health", "/health/live", "/health/ready"):
        assert httpx.get(replica.url + path, timeout=30).status_code == 200
    r = httpx.post(replica.url + "/predict", json=[1, 2], headers={HEADER: TOKEN}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"token_seen_by_model": None, "inputs": [1, 2]}  # taken out of the environment first
    assert httpx.get(replica.url + "/metrics", headers={HEADER: TOKEN}, timeout=30).status_code == 200


def test_tokens_are_per_replica_and_only_where_the_platform_set_a_secret() -> None:
    assert token_for("r-a") is None and headers_for("r-a") == {}  # no platform in this process
    set_secret("s1")
    a, b = token_for("r-a"), token_for("r-b")
    assert a and b and a != b and headers_for("r-a") == {HEADER: a}
    set_secret("s2")
    assert token_for("r-a") != a  # another platform's secret opens nothing of this one's
    replica_auth._secret.clear()


def test_the_log_never_holds_the_token(replica: Replica) -> None:
    httpx.post(replica.url + "/predict", json=1, headers={HEADER: TOKEN}, timeout=30)
    assert TOKEN not in Path(replica.log_path).read_text()
