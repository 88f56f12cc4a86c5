"""Remote deploys: the CLI uploads a checksummed tar.gz; unsafe or damaged uploads are refused, nothing written."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import EXAMPLES, free_port
from tests.control.platform import Platform, kill_leftovers

LIMIT = 200_000
ECHO_YAML = b"name: up\nmodel: model.py:Model\n"
ECHO_MODEL = b"class Model:\n    def predict(self, inputs):\n        return {'echo': inputs}\n"


@pytest.fixture(scope="module")
def plat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    # Listening on every address without TLS: the platform must say so, loudly.
    p = Platform(tmp_path_factory.mktemp("uploads"), args=("--host", "0.0.0.0"))
    p.env["BALLAST_MAX_PACKAGE_BYTES"] = str(LIMIT)
    p.start()
    try:
        yield p
    finally:
        pids = p.replica_pids()
        p.stop()
        kill_leftovers(pids)


def _tar(add: Callable[[tarfile.TarFile], None], with_package: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        if with_package:
            for name, data in (("ballast.yaml", ECHO_YAML), ("model.py", ECHO_MODEL)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        add(tar)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b"x") -> Callable[..., None]:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = link
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return add


def _post(p: Platform, body: bytes, digest: str | None = None, **params: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {p.key}", "content-type": "application/gzip"}
    headers["x-ballast-sha256"] = digest if digest is not None else hashlib.sha256(body).hexdigest()
    return httpx.post(p.url + "/api/v1/packages", content=body, headers=headers, params=params, timeout=30)


def _written(p: Platform) -> list[str]:
    root = p.home / "packages"
    return sorted(str(x.relative_to(root)) for x in root.rglob("*")) if root.exists() else []


def test_warns_when_listening_beyond_loopback_without_tls(plat: Platform) -> None:
    assert "WITHOUT TLS" in plat.output()


def test_cli_deploy_uploads_and_serves(plat: Platform) -> None:
    r = plat.cli("deploy", str(EXAMPLES / "echo"), "--name", "echo", "--wait", "--timeout", "90")
    assert "version 1 created" in r.stdout
    d = plat.show("echo")
    assert d["versions"][0]["fingerprint"] in _written(plat)  # content-addressed copy, as for a local path
    ep = plat.wait_serving("echo", 1)
    url = ep["targets"][0]["replicas"][0]
    url = url["url"] if isinstance(url, dict) else url
    assert httpx.post(url + "/predict", json={"a": 1}, timeout=10).json() == {"echo": {"a": 1}}
    # The same package again reuses its version.
    assert "version 1 reused" in plat.cli("deploy", str(EXAMPLES / "echo"), "--name", "echo").stdout


def test_upload_round_trip_names_and_checksum(plat: Platform) -> None:
    body = _tar(lambda tar: None)
    r = _post(plat, body, name="uploaded", env="staging")
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["deployment"] == "uploaded" and out["version"] == 1
    assert out["sha256"] == hashlib.sha256(body).hexdigest()
    assert out["promotion"]["environment"] == "staging"
    events = plat.api("GET", "/deployments/uploaded/events")["data"]
    assert any("created from an upload (sha256 " in e["message"] for e in events)  # no server path


@pytest.mark.parametrize("case, add, code", [
    ("dotdot", _member("../evil.py"), 400),
    ("nested-dotdot", _member("data/../../evil.py"), 400),
    ("absolute", _member("/tmp/ballast-evil.py"), 400),
    ("symlink-out", _member("data/link", tarfile.SYMTYPE, "../../../etc/passwd"), 400),
    ("symlink-abs", _member("link", tarfile.SYMTYPE, "/etc/passwd"), 400),
    ("hardlink-out", _member("hard", tarfile.LNKTYPE, "../outside"), 400),
    ("fifo", _member("pipe", tarfile.FIFOTYPE), 400),
    ("device", _member("dev", tarfile.CHRTYPE), 400),
    ("oversize", _member("data/big.bin", data=os.urandom(LIMIT + 1)), 413),
    ("bad-config", _member("ballast.yaml", data=b"name: up\nmodel: model.py:Model\nbogus: 1\n"), 400),
])
def test_unsafe_archives_are_refused_and_nothing_is_written(plat: Platform, case: str, add: Callable[..., None],
                                                            code: int) -> None:
    before = _written(plat)
    r = _post(plat, _tar(add), name=f"bad-{case}")
    assert r.status_code == code, r.text
    assert r.json()["error"]["message"]
    assert _written(plat) == before
    assert all(d["name"] != f"bad-{case}" for d in plat.api("GET", "/deployments")["data"])
    assert not Path("/tmp/ballast-evil.py").exists()


def test_bad_or_missing_checksum_and_garbage_are_refused(plat: Platform) -> None:
    before = _written(plat)
    body = _tar(lambda tar: None)
    r = _post(plat, body, digest="0" * 64, name="badsum")
    assert r.status_code == 400 and r.json()["error"]["code"] == "checksum_mismatch"
    assert _post(plat, body, digest="", name="nosum").json()["error"]["code"] == "missing_checksum"
    r = _post(plat, b"not a tar archive", name="garbage")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_archive"
    assert _written(plat) == before


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    port = free_port()
    env = {**os.environ, "BALLAST_HOME": str(tmp_path / "home")}
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ballast.cli.main", "up", "--port", str(port),
                                 "--tls-cert", str(cert), "--tls-key", str(key), "--no-isolation"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"https://127.0.0.1:{port}/api/v1/health"
        for _ in range(300):
            assert proc.poll() is None, log.read_text()
            try:
                r = httpx.get(url, verify=str(cert), timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert r.status_code == 200
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on the TLS port
            httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2).raise_for_status()
        assert f"https://127.0.0.1:{port}/api/v1" in log.read_text()
        assert "WITHOUT TLS" not in log.read_text()
        # The CLI on another machine: a profile with the platform's certificate as its CA.
        key = json.loads((tmp_path / "home" / "credentials.json").read_text())["api_key"]
        client = {k: v for k, v in env.items() if not k.startswith("BALLAST_")}
        client["BALLAST_HOME"] = str(tmp_path / "client")
        base = [sys.executable, "-m", "ballast.cli.main"]
        subprocess.run([*base, "profiles", "add", "tls", "--url", f"https://127.0.0.1:{port}", "--api-key", key,
                        "--ca-cert", str(cert)], env=client, check=True, capture_output=True, timeout=60)
        r = subprocess.run([*base, "deployments", "--profile", "tls"], env=client, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        subprocess.run([*base, "profiles", "add", "nocert", "--url", f"https://127.0.0.1:{port}", "--api-key", key],
                       env=client, check=True, capture_output=True, timeout=60)
        r = subprocess.run([*base, "deployments", "--profile", "nocert"], env=client, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1  # an unknown certificate is never trusted silently
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
