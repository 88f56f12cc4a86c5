"""Async requests on a platform whose store is PostgreSQL: kill -9 mid-queue, restart, every request completes and
every webhook arrives once (the queue claims with FOR UPDATE SKIP LOCKED there)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import write_package
from tests.control.platform import Platform, kill_leftovers
from tests.gateway.test_async_e2e import MODEL
from tests.gateway.webhook_receiver import Receiver
from tests.store.databases import postgres_database

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url():
    yield from postgres_database()


def test_kill_9_mid_queue_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    p = Platform(tmp_path / "home", database_url=pg_url)
    p.env["BALLAST_WEBHOOK_ALLOW"] = "127.0.0.1/32"
    p.env["BALLAST_ASYNC_LEASE_S"] = "3"  # PostgreSQL may be shared by platforms: a dead run's claims lapse first
    p.start()
    pids: list[int] = []
    receiver = None
    try:
        pkg = write_package(tmp_path / "work", """
            name: work
            autoscaling: {min_replicas: 1, max_replicas: 1}
            async: {max_concurrency: 1}
            """, MODEL)
        p.api("POST", "/deployments", expect=201, json={"path": str(pkg)})
        p.wait_serving("work", 1, timeout=120)
        receiver = Receiver(p.api("POST", "/webhook_secret", expect=201)["secret"])
        ids = []
        for i in range(8):
            r = httpx.post(p.url + "/deployments/work/async_predict", timeout=30,
                           headers={"Authorization": f"Bearer {p.key}"},
                           json={"model_input": {"sleep": 0.4, "i": i}, "webhook_endpoint": receiver.url})
            assert r.status_code == 201, r.text
            ids.append(r.json()["request_id"])
        p.wait("some delivered, some queued", lambda: 1 <= len(receiver.by_request()) < 8, timeout=60, every=0.02)
        pids = p.replica_pids()
        p.stop(signal.SIGKILL)
        time.sleep(0.5)
        p.start()
        got = receiver.wait_for(8, timeout=120)
        assert set(got) == set(ids) and all(len(w) == 1 for w in receiver.ids_by_request().values())
        assert receiver.duplicates() <= 2 and receiver.bad_signatures == 0  # (see test_async_e2e: the kill's window)
    finally:
        if receiver is not None:
            receiver.close()
        pids += p.replica_pids() if p.proc and p.proc.poll() is None else []
        p.stop()
        kill_leftovers(pids)
