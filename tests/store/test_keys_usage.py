"""API keys and usage rows in the store, on SQLite and PostgreSQL: hashed keys, revocation, budgets,
and usage upserts that add up exactly under concurrent writers."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from ballast.control import ControlError
from ballast.control.keys import KeyStore
from ballast.store import ApiKey, hash_key, open_store


def _row(key_id: str, hour: datetime, n: int = 1, deployment: str = "chat") -> dict:
    return {"key_id": key_id, "deployment": deployment, "version": 1, "hour": hour, "requests": n,
            "prompt_tokens": 10 * n, "completion_tokens": 5 * n, "cached_tokens": 2 * n, "errors": 0}


def test_keys_are_hashed_listed_and_revoked(database_url):
    engine, sessions = open_store(database_url)
    ks = KeyStore(sessions)
    admin = ks.create(name="root", scopes=["admin"])
    k = ks.create(name="app", scopes=["inference"], deployments=["chat", " "], rpm=10, token_budget=100,
                  budget_per="day")
    with sessions() as s:
        stored = s.get(ApiKey, k["id"])
        assert stored.key_hash == hash_key(k["key"]) and k["key"] not in str(stored.__dict__)
    assert [x["id"] for x in ks.list()] == [admin["id"], k["id"]] and "key" not in ks.list()[0]
    assert k["deployments"] == ["chat"]
    with pytest.raises(ControlError) as e:
        ks.create(scopes=["root"])
    assert e.value.status == 400
    with pytest.raises(ControlError) as e:
        ks.revoke(admin["id"])  # the last admin key
    assert e.value.status == 409
    assert ks.revoke(k["prefix"])["revoked_at"] is not None
    assert [x.id for x in ks.live()] == [admin["id"]]
    assert len(ks.list(include_revoked=True)) == 2
    with pytest.raises(ControlError) as e:
        ks.revoke("key-nope")
    assert e.value.status == 404
    engine.dispose()


def test_usage_upserts_add_up_under_concurrent_writers(database_url):
    engine, sessions = open_store(database_url)
    ks = KeyStore(sessions)
    k = ks.create(scopes=["inference"], token_budget=1000, budget_per="month")
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(10):
                ks.add_usage([_row(k["id"], hour), _row(k["id"], hour, deployment="work")])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    rows = ks.usage(key=k["id"], group="deployment")
    assert {r["deployment"]: r["requests"] for r in rows} == {"chat": 40, "work": 40}
    total = ks.usage(key=k["prefix"], group="key")[0]
    assert (total["requests"], total["prompt_tokens"], total["completion_tokens"], total["cached_tokens"]) == \
        (80, 800, 400, 160)
    # Budgets count this period only.
    ks.add_usage([_row(k["id"], hour - timedelta(days=62), n=3)])
    live = {x.id: x for x in ks.live()}
    assert live[k["id"]].used_in_period == 80 * 15
    assert len(ks.usage(key=k["id"], since=hour - timedelta(days=70))) == 3
    assert len(ks.usage(key=k["id"], since=hour)) == 2
    engine.dispose()
