"""Batches in the store on SQLite and PostgreSQL: lines queued with the batch, finalized into output and error
files once every line has finished; cancel stops what has not started."""

from __future__ import annotations

import json

from ballast.control.async_queue import AsyncQueue
from ballast.control.batches import BatchStore, parse_lines
from ballast.store import open_store


def _file(n: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/embeddings",
                                "body": {"model": "svc", "input": str(i)}}).encode() + b"\n" for i in range(n))


def test_batch_lines_finalize_into_files(database_url: str) -> None:
    sessions = open_store(database_url)[1]
    store, queue = BatchStore(sessions), AsyncQueue(sessions)
    f = store.create_file("key-1", "in.jsonl", "batch", _file(3))
    lines = [(line, "svc") for line in store.input_lines(f["id"], "key-1", False)]
    b = store.create_batch(key_id="key-1", input_file_id=f["id"], endpoint="/v1/embeddings",
                           completion_window="24h", metadata=None, lines=lines)
    claimed = queue.claim("svc", 10)
    assert len(claimed) == 3
    assert {c.batch_id for c in claimed} == {b["id"]}
    store.progress()
    assert store.get_batch(b["id"], "key-1", False)["status"] == "in_progress"
    for i, c in enumerate(claimed):
        queue.finish(c.id, ok=i != 1, version=1, result={"status": 200 if i != 1 else 400, "body": {"i": i}},
                     errors=[] if i != 1 else [{"code": "bad", "message": "nope"}], result_ttl_s=0)
    store.progress()
    done = store.get_batch(b["id"], "key-1", False)
    assert done["status"] == "completed" and done["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    out = [json.loads(x) for x in store.file_content(done["output_file_id"], "key-1", False).splitlines()]
    err = [json.loads(x) for x in store.file_content(done["error_file_id"], "key-1", False).splitlines()]
    assert sorted(x["custom_id"] for x in out) == ["c0", "c2"] and err[0]["error"]["code"] == "bad"
    assert queue.result(claimed[0].id) is None  # written to the file: dropped from the queue


def test_cancel_batch(database_url: str) -> None:
    sessions = open_store(database_url)[1]
    store, queue = BatchStore(sessions), AsyncQueue(sessions)
    f = store.create_file("key-1", "in.jsonl", "batch", _file(4))
    lines = [(line, "svc") for line in parse_lines(_file(4))]
    b = store.create_batch(key_id="key-1", input_file_id=f["id"], endpoint="/v1/embeddings",
                           completion_window="24h", metadata={"a": "b"}, lines=lines)
    (running,) = queue.claim("svc", 1)
    assert store.cancel_batch(b["id"], "key-1", False)["status"] == "cancelling"
    assert queue.claim("svc", 10) == []
    store.progress()
    assert store.get_batch(b["id"], "key-1", False)["status"] == "cancelling"  # one line still running
    queue.finish(running.id, ok=True, version=1, result={"status": 200, "body": {}}, errors=[], result_ttl_s=0)
    store.progress()
    final = store.get_batch(b["id"], "key-1", False)
    assert final["status"] == "cancelled" and final["request_counts"]["completed"] == 1 and final["output_file_id"]
