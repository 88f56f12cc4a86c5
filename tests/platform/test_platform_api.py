"""The platform's REST API in process, reached as a client on another machine would reach it."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ballast.control import ControlPlane
from ballast.platform import create_app
from ballast.platform.auth import bootstrap_admin
from ballast.store import open_store
from tests.conftest import EXAMPLES

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[ControlPlane, str]]:
    _engine, sessions = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    key = bootstrap_admin(sessions)
    assert key is not None
    yield ControlPlane(sessions, tmp_path), key
    _engine.dispose()


def client(control: ControlPlane, key: str, host: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(control), client=(host, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://platform",
                             headers={"Authorization": f"Bearer {key}"})


def tar_of(root: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(root, arcname=root.name)
    return buf.getvalue()


async def test_a_server_path_is_accepted_only_from_loopback(api: tuple[ControlPlane, str]) -> None:
    control, key = api
    async with client(control, key, "10.1.2.3") as remote:
        r = await remote.post("/api/v1/deployments", json={"path": str(EXAMPLES / "echo")})
        assert r.status_code == 403
        err = r.json()["error"]
        assert err["code"] == "server_path_forbidden" and "upload the package" in err["message"]
        assert str(EXAMPLES) not in r.text
        r = await remote.post("/api/v1/dev", json={"path": "/etc"})
        assert r.status_code == 403 and "/etc" not in r.text
    async with client(control, key, "127.0.0.1") as local:
        r = await local.post("/api/v1/deployments", json={"path": str(EXAMPLES / "echo"), "name": "echo"})
        assert r.status_code == 201, r.text
        r = await local.post("/api/v1/deployments", json={"path": "/nonexistent/pkg"})
        assert r.status_code == 404 and "/nonexistent/pkg" in r.json()["error"]["message"]


async def test_upload_errors_never_show_server_paths_to_remote_clients(api: tuple[ControlPlane, str],
                                                                      tmp_path: Path) -> None:
    control, key = api
    bad = tmp_path / "src" / "bad"
    bad.mkdir(parents=True)
    (bad / "ballast.yaml").write_text("name: bad\nmodel: model.py:Model\nruntime: {predict_concurency: 2}\n")
    (bad / "model.py").write_text("class Model:\n    def predict(self, x):\n        return x\n")
    async with client(control, key, "192.0.2.7") as remote:
        r = await remote.post("/api/v1/deployments/bad/versions", content=tar_of(bad),
                              headers={"content-type": "application/gzip"})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "predict_concurency" in message
    assert str(tmp_path) not in message and "upload-" not in message
    async with client(control, key, "192.0.2.7") as remote:  # a good package, sent without a content type
        r = await remote.post("/api/v1/deployments/echo/versions", content=tar_of(EXAMPLES / "echo"))
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("body", [
    b"[" * 5000 + b"]" * 5000,
    b'{"name": "x", "scopes": ["inference"], "deployments": ["\\ud800"]}',
    b'{"name": "\\udfff"}',
])
async def test_malformed_json_is_a_400(api: tuple[ControlPlane, str], body: bytes) -> None:
    control, key = api
    async with client(control, key, "127.0.0.1") as local:
        r = await local.post("/api/v1/keys", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"


async def test_405_names_every_method_of_the_path(api: tuple[ControlPlane, str]) -> None:
    control, key = api
    async with client(control, key, "127.0.0.1") as local:
        r = await local.put("/api/v1/deployments")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, POST"
    assert r.json()["error"]["code"] == "method_not_allowed"
