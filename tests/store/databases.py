"""Fresh databases for one test: a SQLite file, or a uniquely named PostgreSQL database (dropped after).

The PostgreSQL variant skips, saying so, only when no server answers on 127.0.0.1:5432.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("BALLAST_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _admin_conn():  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)


def postgres_database() -> Iterator[str]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("PostgreSQL variant skipped: psycopg is not installed")
    try:
        conn = _admin_conn()
    except Exception as e:
        pytest.skip(f"PostgreSQL variant skipped: no server reachable at {PG_ADMIN_URL} ({type(e).__name__})")
    name = f"ballast_test_{uuid.uuid4().hex[:12]}"
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with _admin_conn() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_url_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
    else:
        yield from postgres_database()
