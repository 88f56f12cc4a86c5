"""`checkpoint: hf:ORG/NAME[@REVISION]` against a real loopback server speaking the Hub's file API
(tests/engine/hubserver.py): download once, resume a cut connection, refuse a wrong checksum, send the
package's HF_TOKEN, and serve the downloaded model from a real replica."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from ballast.engine import LLM, EngineError, SamplingParams, resolve_checkpoint
from ballast.engine.hub import parse_ref
from tests.conftest import write_package
from tests.engine.hubserver import FakeHub

pytest.importorskip("huggingface_hub")

PROMPT = [[{"role": "user", "content": "hello there"}]]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture
def hub_env(tmp_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return tmp_home


def _greedy(path: Path) -> list[int]:
    return LLM(str(path), kv_cache_memory="4Mi").chat(PROMPT, GREEDY)[0].outputs[0].token_ids


def test_download_resumes_a_cut_connection_and_happens_once(tiny: Path, hub_env: Path, monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub writes (and so resumes from) whole 10 MiB chunks; the tiny checkpoint is smaller
    # than one, so the test uses 64 KiB chunks to make the resume visible.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 << 10)
    with FakeHub(tiny, "org/tiny") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        hub.cut_once.add("model.safetensors")
        path = resolve_checkpoint("hf:org/tiny")
        assert path.is_relative_to(hub_env / "models" / "hub")
        for name, data in hub.files.items():
            assert (path / name).read_bytes() == data
        gets = [r for r in hub.log() if r["method"] == "GET" and r["path"].endswith("/model.safetensors")]
        assert len(gets) == 2 and gets[0]["range"] is None
        half = len(hub.files["model.safetensors"]) // 2
        resumed_at = int((gets[1]["range"] or "bytes=0-")[6:-1])
        assert 0 < resumed_at <= half, "resumed with a Range request, not restarted"
        assert _greedy(path) == _greedy(tiny)
        before = len(hub.log())
        assert resolve_checkpoint("hf:org/tiny") == path
        assert len(hub.log()) == before, "a second start makes no request"


def test_wrong_checksum_is_refused_and_downloaded_again_later(tiny: Path, hub_env: Path, monkeypatch):
    with FakeHub(tiny, "org/tiny") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        good = hub.files["model.safetensors"]
        hub.served["model.safetensors"] = good[:-8] + bytes(8 * [7])  # same size, other bytes
        with pytest.raises(EngineError, match=r"model\.safetensors failed verification \(sha256") as e:
            resolve_checkpoint("hf:org/tiny@main")
        assert e.value.code == "checkpoint_corrupt"
        assert not list((hub_env / "models" / "hub").rglob("*.safetensors")), "the bad file is not kept"
        hub.served["model.safetensors"] = good
        path = resolve_checkpoint("hf:org/tiny@main")
        assert (path / "model.safetensors").read_bytes() == good


def test_token_is_sent_and_required(tiny: Path, hub_env: Path, monkeypatch):
    with FakeHub(tiny, "org/private", token="hf_test_token") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        with pytest.raises(EngineError, match="download failed"):
            resolve_checkpoint("hf:org/private")
        hub.requests.clear()
        path = resolve_checkpoint("hf:org/private", token="hf_test_token")
        assert (path / "config.json").is_file()
        assert hub.log() and all(r["authorization"] == "Bearer hf_test_token" for r in hub.log())


@pytest.mark.parametrize("bad", ["hf:", "hf:noslash", "hf:org/../x", "hf:org/x@../y", "hf:org/x@a b"])
def test_malformed_references_are_refused_without_a_request(bad: str):
    with pytest.raises(EngineError, match="expected hf:ORG/NAME"):
        parse_ref(bad)


def test_replica_serves_a_hub_checkpoint_and_restarts_without_downloading(tiny: Path, hub_env: Path, tmp_path,
                                                                          replica_factory):
    pkg = write_package(tmp_path / "pkg", """
        name: hubbed
        secrets: [HF_TOKEN]
        engine:
          kind: native
          checkpoint: hf:org/tiny
          max_model_len: 256
          kv_cache_memory: 8Mi
        """)
    with FakeHub(tiny, "org/tiny", token="hf_pkg_secret") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_pkg_secret", "HF_HUB_DISABLE_TELEMETRY": "1"}
        for start in range(2):
            before = len(hub.log())
            rep = replica_factory(pkg, env=env)
            r = httpx.post(rep.url + "/v1/chat/completions", timeout=60, json={
                "model": "hubbed", "max_tokens": 4, "messages": PROMPT[0]})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] >= 1
            rep.stop()
            if start == 0:
                assert any(r["path"].endswith("/model.safetensors") for r in hub.log())
            else:
                assert len(hub.log()) == before, "the second start downloaded again"


def test_unreachable_hub_is_a_clear_error(hub_env: Path, monkeypatch):
    from ballast.observe import free_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(EngineError, match=r"checkpoint 'hf:org/tiny': download failed: .*Connect"):
        resolve_checkpoint("hf:org/tiny")


def test_replica_with_a_corrupt_download_fails_its_health_with_the_reason(tiny: Path, hub_env: Path, tmp_path,
                                                                         replica_factory):
    pkg = write_package(tmp_path / "pkg", """
        name: corrupt
        engine: {kind: native, checkpoint: "hf:org/tiny", kv_cache_memory: 8Mi}
        """)
    with FakeHub(tiny, "org/tiny") as hub:
        data = hub.files["model.safetensors"]
        hub.served["model.safetensors"] = data[:-8] + bytes(8 * [1])
        rep = replica_factory(pkg, ready=False, env={"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1"})
        rep.wait_listening()
        for _ in range(600):  # bounded: the load fails within seconds
            live = httpx.get(rep.url + "/health/live", timeout=5)
            if live.status_code == 503:
                break
            time.sleep(0.1)
        assert live.status_code == 503
        assert "model.safetensors failed verification" in live.json()["reason"]


def test_cli_download_fills_the_cache_a_replica_then_uses(tiny: Path, hub_env: Path, monkeypatch):
    from typer.testing import CliRunner

    from ballast.cli.models import app

    with FakeHub(tiny, "org/tiny") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = CliRunner().invoke(app, ["download", "hf:org/tiny@main"])
        assert result.exit_code == 0, result.output
        path = Path(result.output.rpartition("ready: ")[2].strip())  # after huggingface_hub's progress bar
        assert (path / "model.safetensors").read_bytes() == hub.files["model.safetensors"]
        before = len(hub.log())
        assert resolve_checkpoint("hf:org/tiny@main") == path and len(hub.log()) == before
        bad = CliRunner().invoke(app, ["download", "hf:not a repo"])
        assert bad.exit_code == 1 and "expected hf:ORG/NAME" in bad.output
