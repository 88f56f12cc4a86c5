"""Control-plane logic on SQLite and PostgreSQL, without processes: versions, environments, promotion,
canary ramps, rollback, retirement and the audit log. (The reconciler's planning step runs for real;
replica readiness is written into the store as the reconciler would.)"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from ballast.control import ControlError, ControlPlane, Reconciler, Settings
from ballast.control.service import canary_percent_at
from ballast.store import Environment, Replica, Version, open_store, utcnow
from tests.conftest import write_package


class NoBackend:
    name = "none"

    def list(self):
        return []


def _pkg(root: Path, i: int) -> Path:
    return write_package(root, "name: svc\n", f"class Model:\n    def predict(self, x):\n        return {i}\n")


@pytest.fixture
def cp(database_url, tmp_path):
    engine, sessions = open_store(database_url)
    yield ControlPlane(sessions, tmp_path / "home", Settings(retire_grace_s=60))
    engine.dispose()


def _ready(cp: ControlPlane, version: int, rid: str | None = None) -> None:
    with cp.sessions() as s, s.begin():
        s.add(Replica(id=rid or f"r-{version}", deployment="svc", version=version, state="ready", pool="none",
                      url=f"http://127.0.0.1:1/{version}", started_at=utcnow()))


def _env(cp: ControlPlane, name: str = "production") -> dict:
    return next(e for e in cp.describe("svc")["environments"] if e["name"] == name)


def test_deploy_reuse_and_bad_package(cp, tmp_path):
    bad = write_package(tmp_path / "bad", "name: svc\nautoscaling: {min_replicas: -1}\n", "class Model: pass\n")
    with pytest.raises(ControlError) as e:
        cp.deploy(bad)
    assert e.value.status == 400 and "min_replicas" in e.value.message
    assert cp.list_deployments() == []
    assert not (cp.packages_dir.exists() and any(cp.packages_dir.iterdir()))

    r1 = cp.deploy(_pkg(tmp_path / "a", 1))
    assert (r1["version"], r1["reused"]) == (1, False)
    assert r1["promotion"] == {"environment": "production", "state": "pending", "version": 1}  # first deploy
    assert Path(r1["package_path"]).name == r1["fingerprint"]
    assert (Path(r1["package_path"]) / "model.py").is_file()
    r1b = cp.deploy(tmp_path / "a")
    assert (r1b["version"], r1b["reused"]) == (1, True)
    r2 = cp.deploy(_pkg(tmp_path / "b", 2))
    assert r2["version"] == 2 and "promotion" not in r2  # later deploys only create the version


def test_promote_waits_for_ready_then_rollback_is_instant(cp, tmp_path):
    rec = Reconciler(cp, NoBackend())
    cp.deploy(_pkg(tmp_path / "a", 1))
    plan = rec._plan()
    assert plan.versions[("svc", 1)].desired == 1  # the pending promotion starts replicas
    assert _env(cp)["version"] is None and _env(cp)["pending"]["version"] == 1
    _ready(cp, 1)
    rec._plan()
    assert _env(cp)["version"] == 1 and _env(cp)["pending"] is None

    cp.deploy(_pkg(tmp_path / "b", 2))
    assert cp.promote("svc", 2, "production", actor="alice")["state"] == "pending"
    assert _env(cp)["version"] == 1  # the pointer does not move before version 2 is ready
    _ready(cp, 2)
    rec._plan()
    env = _env(cp)
    assert (env["version"], env["previous_version"]) == (2, 1)
    assert cp.endpoints("svc", "production")["targets"][0]["replicas"][0]["url"].endswith("/2")

    # v1 left every environment: it keeps running for the grace period, so rollback is instant.
    rec._plan()
    v1 = next(v for v in cp.describe("svc")["versions"] if v["number"] == 1)
    assert v1["retire_at"] is not None and v1["desired"] == 1
    assert cp.rollback("svc", "production", actor="bob")["state"] == "promoted"
    assert _env(cp)["version"] == 1
    rec._plan()
    assert next(v for v in cp.describe("svc")["versions"] if v["number"] == 1)["retire_at"] is None

    # After the grace period a retired version scales to zero; rolling back to it then starts it again.
    rec._plan()  # v2 starts retiring
    with cp.sessions() as s, s.begin():
        s.execute(update(Version).where(Version.number == 2).values(retire_at=utcnow() - timedelta(seconds=1)))
        s.execute(update(Replica).where(Replica.version == 2).values(state="stopping"))
    assert rec._plan().versions[("svc", 2)].desired == 0
    with cp.sessions() as s, s.begin():
        s.query(Replica).filter(Replica.version == 2).delete()
    assert cp.rollback("svc", "production")["state"] == "pending"
    assert rec._plan().versions[("svc", 2)].desired == 1

    kinds = [(e["kind"], e["actor"]) for e in cp.events("svc", limit=100)]
    assert ("promote_requested", "alice") in kinds and ("rollback", "bob") in kinds
    assert ("promoted", "alice") in kinds  # the reconciler lands the promotion in the requester's name


def test_canary_ramps_stepwise_and_can_be_cancelled(cp, tmp_path):
    rec = Reconciler(cp, NoBackend())
    cp.deploy(_pkg(tmp_path / "a", 1))
    _ready(cp, 1)
    rec._plan()
    cp.deploy(_pkg(tmp_path / "b", 2))
    _ready(cp, 2)
    assert cp.promote("svc", 2, "production", canary=25, ramp_s=100)["state"] == "canary"
    assert _env(cp)["traffic"] == [[1, 75], [2, 25]] or _env(cp)["traffic"] == [(1, 75), (2, 25)]

    def age(seconds: float) -> None:
        with cp.sessions() as s, s.begin():
            s.execute(update(Environment).values(canary_started_at=utcnow() - timedelta(seconds=seconds)))

    age(40)  # 3 steps of 25% over 100 s: 25 -> 50 at 33 s
    rec._plan()
    assert _env(cp)["canary"]["percent"] == 50
    age(70)
    rec._plan()
    assert _env(cp)["canary"]["percent"] == 75
    age(101)
    rec._plan()
    env = _env(cp)
    assert env["canary"] is None and env["version"] == 2 and env["previous_version"] == 1
    assert [e["kind"] for e in cp.events("svc")].count("canary_step") == 2

    # A canary without a ramp stays until promoted or rolled back; rollback cancels it.
    cp.deploy(_pkg(tmp_path / "c", 3))
    _ready(cp, 3)
    cp.promote("svc", 3, "production", canary=10)
    rec._plan()
    assert _env(cp)["canary"]["percent"] == 10
    cp.rollback("svc", "production")
    env = _env(cp)
    assert env["canary"] is None and env["version"] == 2


def test_scale_delete_and_errors(cp, tmp_path):
    rec = Reconciler(cp, NoBackend())
    cp.deploy(_pkg(tmp_path / "a", 1))
    cp.scale("svc", "production", min_replicas=2, max_replicas=3)
    assert rec._plan().versions[("svc", 1)].desired == 2
    with pytest.raises(ControlError) as e:
        cp.scale("svc", "production", min_replicas=4, max_replicas=3)
    assert e.value.status == 400
    with pytest.raises(ControlError) as e:
        cp.promote("svc", 9, "production")
    assert e.value.status == 404
    with pytest.raises(ControlError) as e:
        cp.rollback("svc", "staging")
    assert e.value.status == 404
    with pytest.raises(ControlError) as e:
        cp.deploy(tmp_path / "a", "Bad_Name")
    assert e.value.status == 400
    cp.delete("svc")
    assert cp.list_deployments() == []
    assert [e["kind"] for e in cp.events("svc")][-1] == "delete"
    with cp.sessions() as s:
        assert s.scalars(select(Version)).all() == []


def test_canary_percent_steps():
    assert [canary_percent_at(10, 90, t) for t in (0, 9.9, 10, 45, 89.9, 90)] == [10, 10, 20, 50, 90, 100]
    assert canary_percent_at(30, 0, 1000) == 30
