"""Every command that talks to Ballast finds its key the same way: --api-key, BALLAST_API_KEY, then the
key `ballast up` saved, and the saved key only for the platform it belongs to."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ballast.cli.credentials import endpoint_credentials, load_profile, platform_credentials, same_platform
from tests.conftest import write_package
from tests.control.platform import Platform


def _save(home: Path, url: str, key: str) -> None:
    (home / "credentials.json").write_text(json.dumps({"url": url, "api_key": key}))


def test_order_flag_env_then_saved_only_for_its_platform(tmp_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALLAST_API_KEY", raising=False)
    monkeypatch.delenv("BALLAST_URL", raising=False)
    _save(tmp_home, "http://127.0.0.1:8123", "bk_saved")
    c = platform_credentials()
    assert (c.url, c.api_key) == ("http://127.0.0.1:8123", "bk_saved")
    # The gateway of that platform (any route, any loopback name) gets the saved key...
    assert endpoint_credentials("http://localhost:8123/deployments/echo/predict").api_key == "bk_saved"
    # ...a replica on another port or another host never does.
    assert endpoint_credentials("http://127.0.0.1:8080").api_key is None
    assert platform_credentials("https://ballast.example.com").api_key is None
    monkeypatch.setenv("BALLAST_API_KEY", "bk_env")
    assert endpoint_credentials("http://127.0.0.1:8080").api_key == "bk_env"
    assert platform_credentials(api_key="bk_flag").api_key == "bk_flag"
    assert platform_credentials(api_key="bk_flag").headers() == {"Authorization": "Bearer bk_flag"}


def test_url_order_and_missing_or_broken_files(tmp_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALLAST_URL", raising=False)
    assert platform_credentials().url == "http://127.0.0.1:8000"
    (tmp_home / "credentials.json").write_text("{not json")
    assert load_profile().api_key is None
    monkeypatch.setenv("BALLAST_URL", "http://127.0.0.1:9000/api/v1/")
    assert platform_credentials().url == "http://127.0.0.1:9000"
    assert platform_credentials("http://10.0.0.2:8000").url == "http://10.0.0.2:8000"
    with pytest.raises(ValueError, match="unknown profile"):
        load_profile("staging")
    assert same_platform("http://127.0.0.1/x", "http://localhost:80")
    assert not same_platform("https://127.0.0.1:8000", "http://127.0.0.1:8000")


def _cli(p: Platform, *args: str, env: dict[str, str] | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    full = {**p.env, **(env or {})}
    full.pop("BALLAST_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "ballast.cli.main", *args], env=full, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_predict_through_the_gateway_uses_the_saved_key(cli_platform: Platform, tmp_path: Path) -> None:
    route = cli_platform.url + "/deployments/echo/predict"
    r = _cli(cli_platform, "predict", route, "--data", '{"text": "hi"}')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"echo": {"text": "hi"}}
    # Another home has no saved key: 401, and the error says how to pass one.
    r = _cli(cli_platform, "predict", route, env={"BALLAST_HOME": str(tmp_path)})
    assert r.returncode == 1
    assert "401" in r.stderr and "--api-key" in r.stderr
    r = _cli(cli_platform, "predict", route, "--api-key", cli_platform.key or "", env={"BALLAST_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    r = _cli(cli_platform, "predict", route, "--api-key", "bk_wrong")
    assert r.returncode == 1 and "--api-key" in r.stderr


def test_chat_through_the_gateway_uses_the_saved_key(cli_platform: Platform, tiny_checkpoint: Path,
                                                     tmp_path: Path) -> None:
    pkg = write_package(tmp_path / "talk", f"""
        name: talk
        engine: {{kind: native, checkpoint: {tiny_checkpoint}, max_model_len: 256, kv_cache_memory: 8Mi}}
        autoscaling: {{min_replicas: 1, max_replicas: 1}}
        """)
    cli_platform.api("POST", "/deployments", expect=201, json={"path": str(pkg)})
    try:
        cli_platform.wait_serving("talk", 1, timeout=180)
        r = _cli(cli_platform, "chat", cli_platform.url, "--model", "talk", "--max-tokens", "4",
                 stdin="Hello there\n")
        assert r.returncode == 0, r.stderr
        assert "model>" in r.stdout
        r = _cli(cli_platform, "chat", cli_platform.url, "--model", "talk", stdin="Hi\n",
                 env={"BALLAST_HOME": str(tmp_path)})
        assert r.returncode == 1 and "401" in r.stderr
    finally:
        cli_platform.api("DELETE", "/deployments/talk")


def test_platform_commands_take_the_key_from_the_flag(cli_platform: Platform, tmp_path: Path) -> None:
    env = {"BALLAST_HOME": str(tmp_path), "BALLAST_URL": cli_platform.url}
    r = _cli(cli_platform, "deployments", env=env)
    assert r.returncode == 1 and "--api-key" in r.stderr, r.stderr
    r = _cli(cli_platform, "deployments", "--api-key", cli_platform.key or "", env=env)
    assert r.returncode == 0, r.stderr
    assert "echo" in r.stdout
