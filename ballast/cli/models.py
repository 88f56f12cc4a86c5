"""`ballast models ...`: make tiny test checkpoints and import the demo LLM, all offline."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)
