"""Engines, sessions and schema migrations (Alembic, applied at startup so upgrades never need a wipe)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"


def default_url() -> str:
    """SQLite in `$BALLAST_HOME/state.db`."""
    from ballast.home import ballast_home

    return f"sqlite:///{ballast_home() / 'state.db'}"


def safe_url(url: str) -> str:
    """The URL without its password, for logs and messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<invalid database URL>"


def make_engine(url: str) -> Engine:
    """An engine for a SQLite or PostgreSQL URL (`postgresql://` uses psycopg 3)."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("sqlite"):
        _private_sqlite_file(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; crash-safe
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA secure_delete=ON")  # deleted rows (captured data) are zeroed, not left in free pages
            cur.close()

        return engine
    try:
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    except ModuleNotFoundError as e:  # the driver is an extra: say which, not just "No module named psycopg"
        if (e.name or "").startswith("psycopg"):
            raise RuntimeError("a PostgreSQL store needs the psycopg 3 driver: "
                               "pip install 'ballast[postgres]'") from None
        raise


def _private_sqlite_file(url: str) -> None:
    """The store holds key hashes and the audit log: create it 0600 (SQLite's -wal/-shm files copy the mode)."""
    import os

    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    try:
        os.close(os.open(database, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    except FileExistsError:
        pass  # an existing store keeps the mode its owner gave it


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest revision."""
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def open_store(url: str | None = None) -> tuple[Engine, sessionmaker[Session]]:
    """Connect, migrate to head, and return the engine and a session factory."""
    engine = make_engine(url or default_url())
    upgrade(engine)
    return engine, session_factory(engine)
