"""Where Ballast keeps its files: `$BALLAST_HOME`, default `~/.ballast`."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = "~/.ballast"


def home_path() -> Path:
    """The home directory, not created (for readers that must not write, such as `ballast cache list`)."""
    return Path(os.environ.get("BALLAST_HOME") or DEFAULT_HOME).expanduser()


def ballast_home() -> Path:
    """The home directory (created on first use); every cache and state file lives below it."""
    home = home_path()
    home.mkdir(parents=True, exist_ok=True)
    return home
