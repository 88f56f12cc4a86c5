"""Alembic environment: runs against the connection Ballast hands it (see ballast.store.db.upgrade)."""

from alembic import context

from ballast.store.tables import Base

config = context.config
connection = config.attributes.get("connection")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
