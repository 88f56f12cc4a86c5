"""Platform commands (`ballast up`, `deploy`, `promote`, ...): talk to the REST API, never to the store."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the platform commands to the root CLI."""
