"""Chain versions and environments in the store (SQLite and PostgreSQL): recorded once per set of step versions,
promoted and rolled back with every step's environment, an internal key kept as a hash only."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from ballast.control import ControlError, ControlPlane
from ballast.control.chain_keys import ChainKeys, key_id
from ballast.control.chains import ChainStore
from ballast.store import ApiKey, hash_key, open_store
from tests.conftest import write_package


def _deploy(cp: ControlPlane, root: Path, name: str, n: int) -> int:
    pkg = write_package(root / f"{name}-{n}", f"name: {name}\n",
                        f"class Model:\n    def predict(self, x):\n        return {n}\n")
    return int(cp.deploy(pkg, name)["version"])


def test_chain_versions_promote_and_roll_back_every_step(database_url: str, tmp_path: Path) -> None:
    engine, sessions = open_store(database_url)
    cp = ControlPlane(sessions, tmp_path / "home")
    chains = ChainStore(cp)
    steps = [{"step": "Leaf", "deployment": "c-leaf", "version": _deploy(cp, tmp_path, "c-leaf", 1)},
             {"step": "Top", "deployment": "c-top", "version": _deploy(cp, tmp_path, "c-top", 1)}]
    first = chains.record("c", "c-top", steps)
    assert (first["version"], first["reused"]) == (1, False)
    assert chains.record("c", "c-top", steps)["reused"] is True  # the same steps: the same chain version
    chains.promote("c", 1)
    steps2 = [{**steps[0], "version": _deploy(cp, tmp_path, "c-leaf", 2)},
              {**steps[1], "version": _deploy(cp, tmp_path, "c-top", 2)}]
    assert chains.record("c", "c-top", steps2)["version"] == 2
    moved = chains.promote("c", None)  # the newest
    assert (moved["version"], moved["previous_version"]) == (2, 1)
    # No replica is ready in this test: each step's promotion waits (pending) for its version, all of them.
    assert [(m["deployment"], m["version"], m["state"]) for m in moved["steps"]] == [
        ("c-leaf", 2, "pending"), ("c-top", 2, "pending")]
    target = chains.targets()["c"]
    assert target.environments == {"production": ("c-top", 2)} and target.versions[1] == ("c-top", 1)
    assert target.steps == {"c-leaf", "c-top"}
    back = chains.rollback("c")
    assert (back["version"], back["previous_version"]) == (1, 2)
    assert chains.describe("c")["environments"][0]["previous_version"] == 2
    with pytest.raises(ControlError) as e:
        chains.record("c", "c-top", [{"step": "X", "deployment": "c-top", "version": 9}])
    assert e.value.status == 404
    with pytest.raises(ControlError) as e:
        chains.record("c", "c-other", steps)
    assert e.value.status == 400

    # The internal key: one per chain, as a hash, limited to the chain's steps; the secret is derived, not stored.
    with sessions() as s:
        row = s.scalar(select(ApiKey).where(ApiKey.id == key_id("c")))
        assert row is not None and row.deployments == ["c-leaf", "c-top"] and row.scopes == ["inference"]
        secret = ChainKeys(sessions).secret("c")
        assert row.key_hash == hash_key(secret) and secret not in str(row.__dict__)
    assert ChainKeys(sessions).secret("other") != secret
    engine.dispose()


def test_deleting_a_step_is_refused_unless_forced_which_marks_the_chain_versions_broken(
        database_url: str, tmp_path: Path) -> None:
    engine, sessions = open_store(database_url)
    cp = ControlPlane(sessions, tmp_path / "home")
    chains = ChainStore(cp)
    steps = [{"step": "Leaf", "deployment": "d-leaf", "version": _deploy(cp, tmp_path, "d-leaf", 1)},
             {"step": "Top", "deployment": "d-top", "version": _deploy(cp, tmp_path, "d-top", 1)}]
    chains.record("d", "d-top", steps)
    chains.promote("d", 1)
    _deploy(cp, tmp_path, "lonely", 1)
    assert cp.delete("lonely")["deleted"] is True  # a deployment no chain uses goes as before

    with pytest.raises(ControlError) as e:
        cp.delete("d-leaf")
    assert (e.value.status, e.value.code) == (409, "deployment_in_chain") and "chain d (version 1)" in e.value.message
    assert cp.describe("d-leaf")["name"] == "d-leaf"  # nothing was deleted
    assert chains.describe("d")["versions"][0]["broken"] is False

    out = cp.delete("d-leaf", force=True)
    assert out["broken_chain_versions"] == [{"chain": "d", "version": 1, "missing": ["Leaf"]}]
    version = chains.describe("d")["versions"][0]
    assert (version["broken"], version["missing_steps"]) == (True, ["Leaf"])
    target = chains.targets()["d"]
    assert target.broken == {1: ["Leaf"]} and target.env_versions == {"production": 1} and target.steps == {"d-top"}
    with pytest.raises(ControlError) as e:
        chains.promote("d", 1, "staging")
    assert (e.value.status, e.value.code) == (409, "chain_broken") and "Leaf" in e.value.message
    # The same step deployment made anew (its versions start over at 1): a new chain version, not the broken one.
    steps[0]["version"] = _deploy(cp, tmp_path, "d-leaf", 2)
    again = chains.record("d", "d-top", steps)
    assert (again["version"], again["reused"], again["broken"]) == (2, False, False)
    assert cp.delete("d-top", force=True)["broken_chain_versions"] == [
        {"chain": "d", "version": 1, "missing": ["Leaf", "Top"]}, {"chain": "d", "version": 2, "missing": ["Top"]}]
    engine.dispose()
