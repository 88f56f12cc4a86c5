"""Options and output shared by every command, so they read and behave the same everywhere."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.console import Console

UrlOpt = Annotated[str | None, typer.Option(
    "--url", help="Platform URL (default: BALLAST_URL, the saved one, or http://127.0.0.1:8000).")]
KeyOpt = Annotated[str | None, typer.Option(
    "--api-key", help="API key (default: BALLAST_API_KEY, or the key `ballast up` saved for that platform).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]

# Wide enough that a piped table or line is never cut or wrapped; a terminal keeps its own width.
PIPE_WIDTH = 10_000


def make_console(stderr: bool = False) -> Console:
    """A console that fits the terminal, and never truncates when output goes to a pipe or file."""
    c = Console(stderr=stderr, highlight=False)
    if not c.is_terminal and not os.environ.get("COLUMNS"):
        c.width = PIPE_WIDTH
    return c


def confirm(question: str, yes: bool) -> None:
    """Ask before something destructive; refuses (never guesses) when stdin is not a terminal."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise ValueError("refusing without confirmation: stdin is not a terminal (pass --yes to go ahead)")
    if not typer.confirm(question, default=False):
        raise ValueError("not confirmed; nothing changed")
