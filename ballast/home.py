"""Where Ballast keeps its files: `$BALLAST_HOME`, default `~/.ballast`."""

from __future__ import annotations

import os
from pathlib import Path


def ballast_home() -> Path:
    """The home directory (created on first use); every cache and state file lives below it."""
    home = Path(os.environ.get("BALLAST_HOME") or Path.home() / ".ballast").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
