"""The store on SQLite and PostgreSQL: migrations to head, and version numbers under concurrent deploys."""

from __future__ import annotations

import threading
from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from ballast.control import ControlPlane
from ballast.store import Base, open_store
from ballast.store.db import alembic_config
from tests.conftest import write_package

TABLES = {"deployments", "versions", "environments", "replicas", "events", "api_keys", "usage", "settings",
          "async_requests", "batches", "batch_files", "pools", "metric_points", "chain_versions",
          "chain_environments"}


def _pkg(root: Path, i: int) -> Path:
    return write_package(root, "name: svc\n", f"class Model:\n    def predict(self, x):\n        return {i}\n")


def test_migrations_reach_head_and_are_idempotent(database_url):
    engine, _ = open_store(database_url)
    assert set(sa.inspect(engine).get_table_names()) >= TABLES
    with engine.connect() as c:
        # One head (the revision chain never forks), and the store is at it.
        (head,) = ScriptDirectory.from_config(alembic_config()).get_heads()
        assert c.execute(sa.text("select version_num from alembic_version")).scalar() == head
        # The migrations produce exactly the schema the models describe.
        diff = compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata)
        assert diff == []
    engine.dispose()
    engine, _ = open_store(database_url)  # a second start upgrades nothing and breaks nothing
    engine.dispose()


def test_concurrent_deploys_get_distinct_numbers(database_url, tmp_path):
    engine, sessions = open_store(database_url)
    cp = ControlPlane(sessions, tmp_path / "home")
    pkgs = [_pkg(tmp_path / f"p{i}", i) for i in range(6)]
    results: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(pkgs))

    def go(p: Path) -> None:
        try:
            barrier.wait()
            results.append(cp.deploy(p, "svc", env="staging")["version"])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=go, args=(p,)) for p in pkgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(results) == list(range(1, len(pkgs) + 1))

    # The same package deployed concurrently is one version.
    same = _pkg(tmp_path / "same", 99)
    out: list[int] = []
    barrier2 = threading.Barrier(4)

    def again() -> None:
        barrier2.wait()
        out.append(cp.deploy(same, "svc")["version"])

    threads = [threading.Thread(target=again) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(out) == 4 and len(set(out)) == 1 and out[0] == len(pkgs) + 1
    engine.dispose()


def test_postgres_without_its_driver_says_which_extra(tmp_path: Path) -> None:
    """`ballast up --database-url postgresql://...` where psycopg is not installed: one line naming the extra."""
    import os
    import subprocess
    import sys

    shadow = tmp_path / "no-psycopg" / "psycopg"  # an import of psycopg fails here as it does where it is missing
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'psycopg'\", name='psycopg')\n")
    env = {**os.environ, "BALLAST_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "ballast.cli.main", "up", "--port", "1", "--database-url",
                        "postgresql://nobody@127.0.0.1:1/none"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "pip install 'ballast[postgres]'" in r.stderr and "Traceback" not in r.stderr, r.stderr
