"""A deployed chain as a unit on a real `ballast up`: chain versions, promote and roll back together, the internal
key the platform issues to step replicas, and one trace id in every step's log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.chains.test_local import PIPELINE
from tests.conftest import write_package
from tests.control.platform import Platform

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    p = Platform(tmp_path_factory.mktemp("home")).start()
    yield p
    p.stop()


def _run(p: Platform, route: str, inputs: dict, key: str | None = None, **headers: str) -> httpx.Response:
    return httpx.post(f"{p.url}/chains/{route}", json=inputs, timeout=60,
                      headers={"Authorization": f"Bearer {key or p.key}", **headers})


def _deploy(p: Platform, path: Path, name: str, out: Path) -> str:
    return p.cli("chains", "deploy", str(path), "--name", name, "--out", str(out), "--timeout", "120").stdout


def _serving(p: Platform, deployment: str, env: str = "production") -> int:
    return next(e["version"] for e in p.show(deployment)["environments"] if e["name"] == env)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode().split("=", 1) for x in raw if b"=" in x)


@pytest.mark.slow
def test_a_chain_is_promoted_and_rolled_back_as_a_unit(platform: Platform, tmp_path: Path) -> None:
    _deploy(platform, PIPELINE, "unit", tmp_path / "pkgs")
    words = {"text": "banana apple"}
    v1 = _run(platform, "unit/run", words).json()
    assert v1 == {"values": [4.0, 1.0, 0.0, 0.0, 0.0]}

    # A changed chain file is a new version of every step (each package holds the file): steps move together.
    changed = tmp_path / "pipeline2.py"
    changed.write_text(PIPELINE.read_text().replace("float(word.count(c))", "2.0 * word.count(c)"))
    out = _deploy(platform, changed, "unit", tmp_path / "pkgs")
    assert "chain unit version 2 serves production" in out
    chain = platform.api("GET", "/chains/unit")
    assert {s["deployment"]: s["version"] for s in chain["versions"][1]["steps"]} == {
        "unit-split": 2, "unit-embed": 2, "unit-pipeline": 2}
    v2 = {"values": [8.0, 2.0, 0.0, 0.0, 0.0]}
    assert _run(platform, "unit/run", words).json() == v2
    assert _run(platform, "unit/versions/1/run", words).json() == v1  # an older chain version runs its own steps
    assert (_serving(platform, "unit-embed"), _serving(platform, "unit-pipeline")) == (2, 2)

    back = platform.cli("chains", "rollback", "unit").stdout
    assert "production -> version 1" in back
    assert _run(platform, "unit/run", words).json() == v1
    assert (_serving(platform, "unit-split"), _serving(platform, "unit-embed"), _serving(platform, "unit-pipeline")) \
        == (1, 1, 1)
    platform.cli("chains", "promote", "unit", "--version", "2")
    assert _run(platform, "unit/run", words).json() == v2
    assert _serving(platform, "unit-embed") == 2

    # Promoting to another environment moves that environment of every step, and the chain's route for it.
    platform.cli("chains", "promote", "unit", "--version", "1", "--env", "staging")
    assert _run(platform, "unit/environments/staging/run", words).json() == v1
    assert _serving(platform, "unit-embed", "staging") == 1
    nothing = platform.api("POST", "/chains/unit/rollback", expect=409, json={"env": "staging"})
    assert nothing["error"]["code"] == "nothing_to_roll_back"
    assert platform.api("POST", "/chains/nope/promote", expect=404, json={})["error"]["code"] == "chain_not_found"


@pytest.mark.slow
def test_steps_call_each_other_with_a_key_the_platform_issues(platform: Platform, tmp_path: Path) -> None:
    _deploy(platform, PIPELINE, "keyed", tmp_path / "pkgs")
    assert _run(platform, "keyed/run", {"text": "kiwi"}).status_code == 200
    replica = next(r for r in platform.show("keyed-pipeline")["replicas"] if r["state"] == "ready")
    secret = _environ(replica["pid"])["BALLAST_CHAIN_KEY"]
    assert secret.startswith("bk_") and secret != platform.key
    # Stored like every key: hashed, named for the chain, limited to its steps, inference only.
    internal = [k for k in platform.api("GET", "/keys")["data"] if k["name"] == "chain keyed (internal)"]
    assert len(internal) == 1 and secret.startswith(internal[0]["prefix"])
    assert internal[0]["scopes"] == ["inference"]
    assert sorted(internal[0]["deployments"]) == ["keyed-embed", "keyed-pipeline", "keyed-split"]
    # In no package, and the user's key is in no replica's environment.
    files = [f for f in (tmp_path / "pkgs").rglob("*") if f.is_file()]
    assert files and not any(secret in f.read_text(errors="replace") for f in files)
    assert all(platform.key not in "".join(_environ(r["pid"]).values())
               for d in ("keyed-split", "keyed-embed") for r in platform.show(d)["replicas"] if r["pid"])

    # It reaches the chain's steps, and nothing else: not another deployment, not the REST API.
    step = httpx.post(f"{platform.url}/deployments/keyed-split/predict", json={"text": "a b"}, timeout=30,
                      headers={"Authorization": f"Bearer {secret}"})
    assert step.status_code == 200 and step.json() == ["a", "b"]
    pkg = write_package(tmp_path / "other", "name: other\n",
                        "class Model:\n    def predict(self, x):\n        return 1\n")
    platform.cli("deploy", str(pkg), "--name", "other")
    refused = httpx.post(f"{platform.url}/deployments/other/predict", json={}, timeout=30,
                         headers={"Authorization": f"Bearer {secret}"})
    assert refused.status_code == 403, refused.text
    admin = httpx.get(f"{platform.url}/api/v1/deployments", headers={"Authorization": f"Bearer {secret}"})
    assert admin.status_code == 403


@pytest.mark.slow
def test_one_trace_id_appears_in_every_steps_log(platform: Platform, tmp_path: Path) -> None:
    _deploy(platform, PIPELINE, "traced", tmp_path / "pkgs")
    r = _run(platform, "traced/run", {"text": "kiwi apple"}, traceparent=f"00-{TRACE}-00f067aa0ba902b7-01")
    assert r.status_code == 200 and r.headers["x-ballast-trace"] == TRACE

    def logged() -> bool:
        return all(TRACE in platform.api("GET", f"/deployments/traced-{s}/logs", params={"tail": 500})
                   for s in ("pipeline", "split", "embed"))

    platform.wait("the trace id in every step's log", logged, timeout=30)
    fresh = _run(platform, "traced/run", {"text": "kiwi"})
    assert len(fresh.headers["x-ballast-trace"]) == 32 and fresh.headers["x-ballast-trace"] != TRACE
