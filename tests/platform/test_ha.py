"""Two `ballast up --ha` processes on one store: both serve; one reconciles (a lease in the store); when the
leader is killed -9 under load, the other serves every request and takes over reconciling."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from tests.control.platform import Platform, kill_leftovers, pid_alive
from tests.platform.test_pools import Load, package, ready


def leaders(p: Platform) -> list[dict[str, Any]]:
    return [e for e in p.api("GET", "/events?deployment=-")["data"] if e["kind"] == "leader"]


def test_leader_lease_failover_under_load(tmp_path: Path) -> None:
    home = tmp_path / "home"
    a = Platform(home, args=("--ha",)).start()
    b: Platform | None = None
    pids: list[int] = []
    try:
        first = a.wait("a leads", lambda: leaders(a), timeout=30)
        assert first[0]["data"]["holder"].split("-")[-2] == str(a.proc.pid if a.proc else "")
        b = Platform(home, args=("--ha",)).start()
        b.cli("deploy", str(package(tmp_path / "s", "ha")), "--wait", "--timeout", "90")
        reps = b.wait("two ready replicas, seen through b", lambda: ready(b, "ha", 2), timeout=60)
        pids = [r["pid"] for r in reps]
        assert len(leaders(b)) == 1  # b serves, but does not reconcile while a holds the lease
        load = Load(b, "ha")
        load.start()
        try:
            b.wait("traffic through b", lambda: load.sent >= 20, timeout=30)
            a.kill()
            took = b.wait("b takes over", lambda: [e for e in leaders(b) if "took over" in e["message"]], timeout=30)
            assert took[0]["data"]["holder"].split("-")[-2] == str(b.proc.pid if b.proc else "")
            # Reconciling resumes in b: a killed replica is replaced.
            os.kill(reps[0]["pid"], signal.SIGKILL)
            again = b.wait("replaced by b", lambda: (lambda r: r if r and {x["id"] for x in r} == {reps[0]["id"],
                           reps[1]["id"]} and reps[0]["pid"] not in {x["pid"] for x in r} else None)(
                ready(b, "ha", 2)), timeout=60)
            pids = [r["pid"] for r in again]
            sent = load.sent
            b.wait("traffic after the takeover", lambda: load.sent >= sent + 20, timeout=30)
        finally:
            load.finish()
        assert load.errors == [], load.errors[:5]
        # A clean stop of an --ha platform leaves the fleet's replicas running (another platform may lead).
        assert b.stop() == 0
        assert all(pid_alive(pid) for pid in pids)
    finally:
        for p in (a, b):
            if p is not None and p.proc is not None and p.proc.poll() is None:
                p.kill()
        kill_leftovers(pids)
