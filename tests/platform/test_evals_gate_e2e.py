"""Evals and the adapter gate end to end: a real `ballast up`, real replica processes serving the tiny checkpoint on
the native engine, real adapters (`make_lora`), the real SQLite store.

Datasets are built so every expected score is known: references are the deployment's own greedy outputs (read
back through an eval), or another version's, or text the model never writes. The gate then rejects an adapter
whose outputs match production's references worse, and ships one that matches its own: evaluated, canaried,
promoted after the hold, every step an event naming the job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from ballast.engine.tools.lora import make_lora
from tests.conftest import write_package
from tests.control.platform import Platform, kill_leftovers

pytest.importorskip("ballast.engine", reason="the native engine is not built")

PROMPTS = [f"Tell me about {w} number {i}" for i, w in enumerate(["ships", "rivers", "stars", "numbers", "voices"] * 4)]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def plat(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    root = tmp_path_factory.mktemp("evals")
    write_package(root / "chat", f"""
        name: chat
        engine: {{kind: native, checkpoint: {tiny_checkpoint}, max_model_len: 256, kv_cache_memory: 16Mi}}
        autoscaling: {{min_replicas: 1, max_replicas: 1}}
        capture: {{dataset: traffic, sample_rate: 1.0}}
        """)
    make_lora(tiny_checkpoint, root / "sql", rank=8, seed=3)
    make_lora(tiny_checkpoint, root / "slow", rank=8, seed=4)
    p = Platform(root / "home", retire_grace_s=300).start()
    p.root = root  # type: ignore[attr-defined]
    try:
        p.api("POST", "/deployments", expect=201, json={"path": str(root / "chat")})
        p.wait_serving("chat", 1, timeout=180)
        yield p
    finally:
        pids = p.replica_pids() if p.proc and p.proc.poll() is None else []
        p.stop()
        kill_leftovers(pids)


def _import(p: Platform, name: str, answers: list[str]) -> None:
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
             for q, a in zip(PROMPTS, answers, strict=True)]
    p.api("POST", f"/datasets/{name}/import", expect=201, json={"jsonl": "\n".join(lines)})


def _eval(p: Platform, expect: int = 200, **body: Any) -> Any:
    body = {"split": "all", "max_tokens": MAX_TOKENS, "concurrency": 1, **body}
    r = httpx.post(p.url + "/api/v1/evals", json=body, headers={"Authorization": f"Bearer {p.key}"}, timeout=600)
    assert r.status_code == expect, r.text
    return r.json()


def _ship(p: Platform, expect: int = 200, **body: Any) -> Any:
    r = httpx.post(p.url + "/api/v1/adapters/ship", json=body, headers={"Authorization": f"Bearer {p.key}"},
                   timeout=600)
    assert r.status_code == expect, r.text
    return r.json()


def _outputs(p: Platform, target: str) -> list[str]:
    """`target`'s greedy answer to each prompt, read back through an eval (whose dataset is the prompts)."""
    if not any(d["name"] == "prompts" for d in p.api("GET", "/datasets")["data"]):
        _import(p, "prompts", ["-"] * len(PROMPTS))
    out = _eval(p, targets=[target], dataset="prompts")
    by_record = sorted(out["data"], key=lambda e: e["record"])
    texts = [e[target]["output"] for e in by_record]
    assert all(isinstance(t, str) and t.strip() for t in texts), texts
    return texts


def _traffic(p: Platform, n: int = 6) -> None:
    """Requests to the deployment during a canary's hold (a 50% canary gets every other one)."""
    for _ in range(n):
        r = httpx.post(p.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {p.key}"}, timeout=60,
                       json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200, r.text


def _events(p: Platform, kind: str) -> list[dict[str, Any]]:
    return [e for e in p.api("GET", "/events", params={"deployment": "chat", "limit": 500})["data"]
            if e["kind"] == kind]


def test_eval_scores_known_from_real_outputs(plat: Platform) -> None:
    base = _outputs(plat, "chat")
    half = [t if i % 2 == 0 else "an answer the model never writes" for i, t in enumerate(base)]
    _import(plat, "half", half)
    out = _eval(plat, targets=["chat"], dataset="half", metrics=["exact", "contains", "regex:\\S"])
    assert out["examples"] == len(PROMPTS) and out["failed"] == {"chat": 0}
    assert out["scores"]["chat"] == {"exact": 0.5, "contains": 0.5, "regex:\\S": 1.0}
    assert [e["chat"]["scores"]["exact"] for e in sorted(out["data"], key=lambda e: e["record"])] == \
        [1.0, 0.0] * (len(PROMPTS) // 2)
    kept = plat.api("GET", f"/evals/{out['id']}")  # kept as an event: scores and record ids, no text
    assert kept["scores"] == out["scores"] and len(kept["per_example"]) == len(PROMPTS)
    assert base[0] not in json.dumps(kept) and PROMPTS[0] not in json.dumps(kept)
    assert out["id"] in [e["id"] for e in plat.api("GET", "/evals")["data"]]
    shown = plat.cli("evals", "show", str(out["id"])).stdout
    assert "eval on half (all, 20 examples)" in shown and "chat: exact=0.500  contains=0.500" in shown
    plat.api("GET", "/datasets/traffic", expect=404)  # capture is on, but an eval's requests are not captured
    held = _eval(plat, targets=["chat"], dataset="half", split="heldout", held_out=0.2)
    assert held["examples"] == 4  # the same seeded split as `datasets export --held-out 0.2`


def test_eval_errors(plat: Platform) -> None:
    def err(status: int, **body: Any) -> dict[str, Any]:
        r = _eval(plat, expect=status, **{"targets": ["chat"], "dataset": "half", **body})
        return dict(r["error"])

    assert err(404, dataset="nope")["code"] == "not_found"
    assert err(404, targets=["nope"])["code"] == "model_not_found"
    assert err(404, targets=["chat:9"])["code"] == "invalid_target"
    assert err(400, metrics=["bleu"])["param"].startswith("metrics")
    assert err(400, metrics=["regex:(oops"])["param"] == "metrics"
    assert err(400, targets=["a", "b", "c"])["code"] == "invalid_request"
    assert err(400, split="test")["code"] == "invalid_request"


def test_gate_rejects_a_loser_and_deploys_nothing(plat: Platform) -> None:
    base = _outputs(plat, "chat")
    _import(plat, "base-refs", base)
    ship = {"deployment": "chat", "adapter_path": str(plat.root / "sql"), "adapter_name": "sql",  # type: ignore[attr-defined]
            "dataset": "base-refs"}
    assert _ship(plat, 404, **{**ship, "dataset": "nope"})["error"]["code"] == \
        "not_found"
    assert _ship(plat, 404, **{**ship, "adapter_path": "/etc"})["error"]["code"] == \
        "adapter_not_found"
    assert _ship(plat, 400, **{**ship, "metric": "regex:("})["error"]["param"] == \
        "metrics"
    assert [v["number"] for v in plat.show("chat")["versions"]] == [1]  # refused before any version was made
    gate = _ship(plat, **ship, metric="exact", margin=0.0, job_id="ftjob-lose", hold_s=1, max_tokens=MAX_TOKENS)
    assert gate["decision"] == "rejected" and gate["version"] is None, gate
    assert gate["production_score"] == 1.0 and gate["candidate_score"] < 1.0
    prod = {e["name"]: e for e in plat.show("chat")["environments"]}["production"]
    assert prod["version"] == 1 and prod["canary"] is None and prod["pending"] is None
    [rejected] = _events(plat, "gate_rejected")
    assert rejected["data"]["job_id"] == "ftjob-lose" and rejected["data"]["candidate_version"] == 2
    assert any(e["data"].get("job_id") == "ftjob-lose" for e in _events(plat, "eval"))
    assert not _events(plat, "canary")


def test_two_targets_side_by_side(plat: Platform) -> None:
    out = _eval(plat, targets=["chat:1", "chat:2"], dataset="base-refs", metrics=["exact"])
    a, b = out["scores"]["chat:1"]["exact"], out["scores"]["chat:2"]["exact"]
    assert a == 1.0 and out["delta"] == {"exact": b - a}
    differ = {e["record"] for e in out["data"] if e["chat:1"]["output"] != e["chat:2"]["output"]}
    assert set(out["disagree"]) == differ and differ  # version 2 answers with the adapter: outputs differ
    cli = plat.cli("evals", "run", "--target", "chat:1", "--target", "chat:2", "--dataset", "base-refs",
                   "--split", "all", "--max-tokens", str(MAX_TOKENS), "--concurrency", "1", timeout=600)
    assert f"delta (chat:2 − chat:1): exact={b - a:+.3f}" in cli.stdout and f"{len(differ)} examples differ" in \
        cli.stdout
    assert "base-refs" in plat.cli("evals", "list").stdout


def test_gate_ships_a_winner_as_a_canary_then_promotes(plat: Platform) -> None:
    _import(plat, "sql-refs", _outputs(plat, "chat:2"))  # the adapter's own greedy answers
    out = plat.cli("adapters", "ship", "chat", str(plat.root / "sql"), "--dataset", "sql-refs",  # type: ignore[attr-defined]
                   "--metric", "exact", "--margin", "0.5", "--canary", "50", "--hold-s", "4", "--json",
                   "--max-tokens", str(MAX_TOKENS), "--job-id", "ftjob-win", timeout=600)
    gate = json.loads(out.stdout)
    assert gate["decision"] == "canary" and gate["version"] == 2, gate  # the same package: version 2 reused
    assert gate["candidate_score"] == 1.0 and gate["candidate_score"] - gate["production_score"] >= 0.5
    _traffic(plat)
    plat.wait("canary promoted", lambda: _events(plat, "canary_promoted"), timeout=120, every=0.5)
    prod = {e["name"]: e for e in plat.show("chat")["environments"]}["production"]
    assert prod["version"] == 2 and prod["canary"] is None
    assert [e["kind"] for e in plat.api("GET", "/events", params={"deployment": "chat", "limit": 500})["data"]
            if e["kind"] in ("gate_passed", "canary", "canary_promoted")] == ["gate_passed", "canary",
                                                                              "canary_promoted"]
    [canary] = _events(plat, "canary")
    assert canary["data"]["percent"] == 50 and canary["actor"] == "adapter-gate job ftjob-win"
    assert _events(plat, "gate_passed")[0]["data"]["job_id"] == "ftjob-win"
    assert _events(plat, "canary_promoted")[0]["data"]["job_id"] == "ftjob-win"
    assert _outputs(plat, "chat") == _outputs(plat, "chat:2")  # the deployment's name now gets the adapter


def test_a_canary_that_does_not_hold_is_rolled_back(plat: Platform) -> None:
    """A margin of -1 passes any adapter; a latency bound no real replica meets (0.001 x the stable's, no slack)
    makes the guard roll the canary back once both versions served requests in the hold."""
    gate = _ship(plat, deployment="chat", adapter_path=str(plat.root / "slow"),  # type: ignore[attr-defined]
                 adapter_name="slow", dataset="sql-refs", margin=-1, canary_percent=50, hold_s=6,
                 max_tokens=MAX_TOKENS, job_id="ftjob-slow", max_latency_ratio=0.001, latency_slack_s=0)
    assert gate["decision"] == "canary" and gate["production_version"] == 2 and gate["version"] == 3, gate
    _traffic(plat, 8)
    [back] = plat.wait("canary rolled back", lambda: _events(plat, "canary_rolled_back"), timeout=120, every=0.5)
    assert back["data"]["job_id"] == "ftjob-slow" and "latency" in back["data"]["reason"]
    prod = {e["name"]: e for e in plat.show("chat")["environments"]}["production"]
    assert prod["version"] == 2 and prod["canary"] is None


def test_a_restart_during_the_hold_starts_the_guard_again(plat: Platform) -> None:
    """kill -9 of the platform during a canary's hold: the restarted platform guards it again (a whole new hold)
    and decides; the canary is not left at its percent."""
    gate = _ship(plat, deployment="chat", adapter_path=str(plat.root / "slow"),  # type: ignore[attr-defined]
                 adapter_name="slow", dataset="sql-refs", margin=-1, canary_percent=50, hold_s=5,
                 max_tokens=MAX_TOKENS, job_id="ftjob-restart")
    assert gate["decision"] == "canary", gate
    plat.kill()  # inside the 5 s hold: the guard dies with the process
    assert not [e for e in _decisions_in_store(plat) if e["data"].get("job_id") == "ftjob-restart"]
    plat.start()
    [resumed] = plat.wait("the guard resumed", lambda: [e for e in _events(plat, "canary_guard_resumed")
                                                        if e["data"]["job_id"] == "ftjob-restart"], timeout=60)
    assert resumed["data"]["version"] == gate["version"] and resumed["actor"] == "adapter-gate job ftjob-restart"
    plat.wait("the resumed guard decided", lambda: [e for e in _events(plat, "canary_promoted")
                                                    if e["data"]["job_id"] == "ftjob-restart"], timeout=120, every=0.5)
    prod = {e["name"]: e for e in plat.show("chat")["environments"]}["production"]
    assert prod["version"] == gate["version"] and prod["canary"] is None
    plat.stop()  # a clean stop and start: nothing is left to resume
    plat.start()
    assert len([e for e in _events(plat, "canary_guard_resumed") if e["data"]["job_id"] == "ftjob-restart"]) == 1


def _decisions_in_store(p: Platform) -> list[dict[str, Any]]:
    """The guards' decisions in the store, read directly (the platform is down while this runs)."""
    import sqlite3

    db = sqlite3.connect(p.home / "state.db")
    try:
        rows = db.execute("SELECT kind, data FROM events WHERE kind IN "
                          "('canary_promoted', 'canary_rolled_back', 'canary_superseded')").fetchall()
    finally:
        db.close()
    return [{"kind": k, "data": json.loads(d)} for k, d in rows]
