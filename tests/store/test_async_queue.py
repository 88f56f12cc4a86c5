"""The durable async queue on SQLite and PostgreSQL: concurrent claims never share a row, priorities order the
claims, a dead run's claims go back to the queue, expiry, cancel, the queue limit and what is kept."""

from __future__ import annotations

import threading
import time

import pytest

from ballast.control.async_queue import AsyncQueue
from ballast.control.errors import ControlError
from ballast.store import open_store


def _queue(url: str, run: str = "run-a") -> AsyncQueue:
    return AsyncQueue(open_store(url)[1], run)


def _submit(q: AsyncQueue, i: int, priority: int = 1, wait: float = 600.0, hook: str | None = "http://h/x",
            max_queue: int = 10_000) -> str:
    return q.submit(deployment="svc", target="svc", kind="predict", key_id="key-1", payload={"body": {"i": i}},
                    webhook_endpoint=hook, priority=priority, max_time_in_queue_s=wait, max_queue=max_queue)


def test_concurrent_claims_take_each_request_once(database_url: str) -> None:
    q = _queue(database_url)
    ids = {_submit(q, i) for i in range(60)}
    others = [AsyncQueue(q.sessions, f"run-{n}") for n in range(4)]
    taken: list[str] = []
    lock = threading.Lock()

    def claimer(c: AsyncQueue) -> None:
        for _ in range(200):  # bounded
            got = c.claim("svc", 3)
            if not got and not q.depths():
                return
            with lock:
                taken.extend(x.id for x in got)

    threads = [threading.Thread(target=claimer, args=(c,)) for c in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(taken) == sorted(ids)  # all claimed, none twice


def test_priority_then_age_and_recovery(database_url: str) -> None:
    q = AsyncQueue(open_store(database_url)[1], "run-a", lease_s=0.5)
    low = _submit(q, 0, priority=2)
    mid = _submit(q, 1, priority=1)
    high = _submit(q, 2, priority=0)
    assert [c.id for c in q.claim("svc", 2)] == [high, mid]
    assert q.depths() == {"svc": 1}
    other = AsyncQueue(q.sessions, "run-b")
    assert other.recover() == 0  # run-a's leases are live: another run never takes its work
    q.renew()
    # run-a dies: once its leases lapse, its claims go back and run again (attempt 2), in priority order
    time.sleep(0.7)
    assert other.recover() == 2
    again = other.claim("svc", 5)
    assert [c.id for c in again] == [high, mid, low] and [c.attempts for c in again] == [2, 2, 1]
    q.finish(high, ok=True, version=1, result=None, errors=[], result_ttl_s=0)  # the dead run's late answer
    assert (q.get(high) or ("", {}))[1]["status"] == "IN_PROGRESS"  # is not recorded: run-b has it now
    assert other.release() == 3 and q.depths() == {"svc": 3}  # a clean stop hands its claims back at once


def test_sqlite_startup_takes_back_every_claim(tmp_path) -> None:  # type: ignore[no-untyped-def]
    q = _queue(f"sqlite:///{tmp_path / 'state.db'}")
    _submit(q, 0)
    q.claim("svc", 1)
    restarted = AsyncQueue(q.sessions, "run-b")
    assert restarted.recover() == 0 and restarted.recover(startup=True) == 1  # one platform per SQLite store


def test_finish_keeps_output_only_for_the_webhook_or_ttl(database_url: str) -> None:
    q = _queue(database_url)
    hooked, plain = _submit(q, 0), _submit(q, 1, hook=None)
    q.claim("svc", 2)
    q.finish(hooked, ok=True, version=1, result={"status": 200, "body": {"x": 1}}, errors=[], result_ttl_s=0)
    q.finish(plain, ok=True, version=1, result={"status": 200, "body": {"x": 2}}, errors=[], result_ttl_s=60)
    (d,) = q.due_deliveries()
    assert d.id == hooked and d.body["data"] == {"x": 1} and d.body["type"] == "async_request.completed"
    assert q.result(hooked) is None  # no TTL: not readable, only held for the webhook
    q.delivered(hooked)
    owner, view = q.get(hooked) or ("", {})
    assert owner == "key-1" and view["status"] == "SUCCEEDED" and view["webhook"]["state"] == "delivered"
    assert q.due_deliveries() == []
    assert q.result(plain) == {"status": 200, "body": {"x": 2}}


def test_webhook_failure_and_expiry_and_cancel(database_url: str) -> None:
    q = _queue(database_url)
    rid = _submit(q, 0)
    q.claim("svc", 1)
    q.finish(rid, ok=False, version=1, result=None, errors=[{"code": "x", "message": "boom"}], result_ttl_s=0)
    q.delivery_failed(rid, "the webhook answered 500", None)
    assert (q.get(rid) or ("", {}))[1]["status"] == "WEBHOOK_FAILED"
    short = _submit(q, 1, wait=0.2)
    time.sleep(0.3)
    assert q.claim("svc", 5) == []  # past its time in the queue: never started
    assert q.expire_due() == 1 and (q.get(short) or ("", {}))[1]["status"] == "EXPIRED"
    c = _submit(q, 2)
    assert q.cancel(c)["status"] == "CANCELED"
    with pytest.raises(ControlError) as e:
        q.cancel(c)
    assert e.value.status == 409


def test_queue_limit(database_url: str) -> None:
    q = _queue(database_url)
    for i in range(3):
        _submit(q, i, max_queue=3)
    with pytest.raises(ControlError) as e:
        _submit(q, 9, max_queue=3)
    assert e.value.status == 429 and e.value.code == "queue_full"
