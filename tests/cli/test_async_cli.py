"""`ballast async ...` and `ballast batches ...` against a real platform, with the credentials `ballast up` saved."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import write_package
from tests.control.platform import Platform
from tests.gateway.test_async_e2e import MODEL


def _deploy(p: Platform, root: Path) -> None:
    pkg = write_package(root / "queued", """
        name: queued
        autoscaling: {min_replicas: 1, max_replicas: 1, concurrency_target: 2}
        async: {result_ttl_s: 600}
        """, MODEL)
    p.api("POST", "/deployments", expect=201, json={"path": str(pkg)})
    p.wait_serving("queued", 1, timeout=120)


def test_async_and_batches_commands(cli_platform: Platform, tmp_path: Path) -> None:
    p = cli_platform
    _deploy(p, tmp_path)
    rid = p.cli("async", "submit", "queued", "--input", '{"n": 7}', "--priority", "0").stdout.strip()
    assert rid.startswith("req-")
    p.wait("async request done", lambda: "SUCCEEDED" in p.cli("async", "get", rid).stdout, timeout=60)
    assert json.loads(p.cli("async", "get", rid, "--result").stdout)["echo"] == {"n": 7}
    st = json.loads(p.cli("async", "get", rid, "--json").stdout)
    assert st["status"] == "SUCCEEDED" and st["priority"] == 0
    r = p.cli("async", "cancel", rid, check=False)
    assert r.returncode == 1 and "only a QUEUED request can be canceled" in r.stderr
    r = p.cli("async", "submit", "queued", check=False)
    assert r.returncode == 1 and "--input" in r.stderr

    lines = tmp_path / "in.jsonl"
    body = {"model": "queued", "messages": [{"role": "user", "content": "hi {i}"}]}
    lines.write_text("".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                         "body": body}).replace("{i}", str(i)) + "\n" for i in range(3)))
    created = json.loads(p.cli("batches", "create", str(lines), "--metadata", "job=cli", "--json").stdout)
    bid = created["id"]
    assert created["metadata"] == {"job": "cli"} and created["request_counts"]["total"] == 3
    p.wait("batch completed", lambda: "completed (3/3" in p.cli("batches", "get", bid).stdout, timeout=90)
    out = [json.loads(x) for x in p.cli("batches", "results", bid).stdout.splitlines()]
    assert sorted(x["custom_id"] for x in out) == ["c0", "c1", "c2"]
    assert {x["response"]["body"]["choices"][0]["message"]["content"] for x in out} == {"HI 0", "HI 1", "HI 2"}
    r = p.cli("batches", "results", bid, "--errors", check=False)
    assert r.returncode == 1 and "has no error file" in r.stderr
    assert bid in p.cli("batches", "list", "--limit", "5").stdout
    r = p.cli("batches", "cancel", bid, check=False)
    assert r.returncode == 1 and "cannot be cancelled" in r.stderr
    # A batch whose lines name an unknown deployment fails, naming the line.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines.read_text().replace('"model": "queued"', '"model": "nope"', 1))
    assert "failed (0/0 completed, 0 failed): request 1" in p.cli("batches", "create", str(bad)).stdout
