"""The reconciler's leader lease on SQLite and PostgreSQL: one holder at a time, takeover after expiry,
a clean release hands over at once, and a takeover is an event."""

from __future__ import annotations

import threading
import time

from sqlalchemy import select

from ballast.control.lease import Lease
from ballast.store import Event, open_store


def test_one_holder_takeover_after_expiry_and_release(database_url: str) -> None:
    engine, sessions = open_store(database_url)
    a, b = Lease(sessions, "a", ttl_s=0.5), Lease(sessions, "b", ttl_s=0.5)
    assert a.hold() and a.hold()  # taken, then renewed
    assert not b.hold()
    time.sleep(0.7)  # a stops renewing (killed): the lease expires
    assert b.hold() and not a.hold() and b.hold()
    b.release()
    assert a.hold()
    with sessions() as s:
        messages = [e.message for e in s.scalars(select(Event).where(Event.kind == "leader").order_by(Event.id))]
    assert messages == ["platform a reconciles", "platform b reconciles (took over from a)", "platform a reconciles"]
    engine.dispose()


def test_concurrent_claims_give_one_holder(database_url: str) -> None:
    engine, sessions = open_store(database_url)
    leases = [Lease(sessions, f"p{i}", ttl_s=30) for i in range(6)]
    results: dict[str, bool] = {}
    barrier = threading.Barrier(len(leases))

    def claim(lease: Lease) -> None:
        barrier.wait()
        results[lease.holder] = lease.hold()

    threads = [threading.Thread(target=claim, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(results.values()) == 1, results
    engine.dispose()
