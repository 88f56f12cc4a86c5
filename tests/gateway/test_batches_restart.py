"""kill -9 of the platform in the middle of an OpenAI batch: after a restart every line completes, exactly once in
the output file, and the batch reaches `completed`."""

from __future__ import annotations

import io
import json
import signal
import time

import openai
import pytest

from tests.conftest import write_package
from tests.control.platform import Platform, kill_leftovers
from tests.gateway.test_async_e2e import MODEL

LINES = 300


def _client(p: Platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=p.url + "/v1", api_key=p.key, max_retries=0, timeout=30)


def test_kill_9_mid_batch_then_every_line_completes_once(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("batch-kill")
    p = Platform(root / "home").start()
    pids: list[int] = []
    try:
        pkg = write_package(root / "one", """
            name: one
            autoscaling: {min_replicas: 1, max_replicas: 1, concurrency_target: 1}
            """, MODEL)
        p.api("POST", "/deployments", expect=201, json={"path": str(pkg)})
        p.wait_serving("one", 1, timeout=120)
        rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "one", "messages": [{"role": "user", "content": f"line {i}"}]}}
                for i in range(LINES)]
        c = _client(p)
        f = c.files.create(file=("in.jsonl", io.BytesIO(b"".join(json.dumps(r).encode() + b"\n" for r in rows))),
                           purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        p.wait("the batch running", lambda: c.batches.retrieve(b.id).status == "in_progress", timeout=120,
               every=0.02)
        time.sleep(1.0)  # lines run one at a time (concurrency_target 1): some are done, most are not
        assert c.batches.retrieve(b.id).status == "in_progress"
        pids = p.replica_pids()
        p.stop(signal.SIGKILL)
        time.sleep(0.5)
        Platform.start(p)
        c = _client(p)
        done = p.wait("batch completed after the restart",
                      lambda: (x := c.batches.retrieve(b.id)).status == "completed" and x, timeout=300)
        assert done.request_counts.completed == LINES and done.request_counts.failed == 0
        out = [json.loads(x) for x in c.files.content(done.output_file_id).text.splitlines()]
        ids = [x["custom_id"] for x in out]
        assert sorted(ids) == sorted(f"r{i}" for i in range(LINES))  # every line, none twice
        for x in out:
            i = int(x["custom_id"][1:])
            assert x["response"]["status_code"] == 200
            assert x["response"]["body"]["choices"][0]["message"]["content"] == f"LINE {i}"
    finally:
        alive = p.replica_pids() if p.proc and p.proc.poll() is None else []
        p.stop()
        kill_leftovers(pids + alive)
