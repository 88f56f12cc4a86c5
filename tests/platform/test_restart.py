"""Restart safety and clean exits, on SQLite and PostgreSQL: kill -9 the platform and start it again."""

from __future__ import annotations

import signal

import httpx

from tests.control.platform import Platform, kill_leftovers, pid_alive
from tests.platform.test_platform import versioned


def test_platform_restart_keeps_everything_and_exits_clean(database_url, tmp_path):
    home = tmp_path / "home"
    p = Platform(home, database_url=database_url).start()
    pids: list[int] = []
    try:
        p.cli("deploy", str(versioned(tmp_path / "v1", 1, name="keep")), "--wait", "--timeout", "60")
        p.api("POST", "/deployments", json={"path": str(versioned(tmp_path / "v2", 2, name="keep")),
                                            "env": "staging"}, expect=201)
        p.wait_serving("keep", 2, env="staging")
        before = p.show("keep")
        pids = [r["pid"] for r in before["replicas"]]
        assert len(pids) == 2

        p.kill()  # kill -9: replicas keep running and serving
        for r in before["replicas"]:
            assert httpx.post(r["url"] + "/predict", json=1).status_code == 200

        p = Platform(home, database_url=database_url, port=p.port).start()
        after = p.show("keep")
        assert [v["number"] for v in after["versions"]] == [1, 2]
        assert {e["name"]: e["version"] for e in after["environments"]} == {"production": 1, "staging": 2}
        assert sorted(r["pid"] for r in after["replicas"]) == sorted(pids)  # re-adopted, not restarted
        assert all(r["restarts"] == 0 for r in after["replicas"])
        p.wait("replicas ready after re-adoption",
               lambda: all(r["state"] == "ready" for r in p.show("keep")["replicas"]))
        assert "replica_adopted" in [e["kind"] for e in p.api("GET", "/events?deployment=keep")["data"]]

        # Ctrl-C: the platform stops every replica and exits.
        assert p.stop(signal.SIGINT) == 0, p.output()[-3000:]
        assert not [pid for pid in pids if pid_alive(pid)]

        # Next start: the replicas come back from the desired state in the store.
        p = Platform(home, database_url=database_url).start()
        p.wait_serving("keep", 1)
        p.wait_serving("keep", 2, env="staging")
        pids = [r["pid"] for r in p.show("keep")["replicas"]]
        assert p.stop(signal.SIGTERM) == 0
        assert not [pid for pid in pids if pid_alive(pid)]
    finally:
        if p.proc and p.proc.poll() is None:
            p.stop()
        kill_leftovers(pids)
