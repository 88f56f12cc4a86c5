"""`ballast cache list|clean`: what Ballast keeps under $BALLAST_HOME, and removing it safely.

Models and requirement environments are caches (re-created on demand) but the replicas of a running
platform use them, so they are only removed while no platform of this home runs. Package copies are
what a platform's versions run from: only the running platform can say which are unused, so packages
are removed only with its answer, and only the ones no version references.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.table import Table

from ballast.cli.credentials import load_profile
from ballast.cli.options import JsonOpt, YesOpt, confirm, make_console
from ballast.cli.platform_client import PlatformClient
from ballast.home import home_path

console = make_console()
app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)

CATEGORIES = {
    "models": "LLM checkpoints imported by Ballast (imported again when needed)",
    "envs": "per-package requirement environments (installed again when needed)",
    "packages": "package copies that deployed versions run from",
    "logs": "replica logs written by `ballast up`",
}


@dataclass
class Entry:
    category: str
    path: Path
    size: int


def tree_size(path: Path) -> int:
    """Bytes of every file below `path` (symlinks not followed, unreadable files skipped)."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size if path.exists() or path.is_symlink() else 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def cache_entries(home: Path, categories: list[str] | None = None) -> list[Entry]:
    """One entry per directory (or file) directly under each category's folder."""
    out = []
    for cat in categories or list(CATEGORIES):
        folder = home / cat
        if folder.is_dir():
            out += [Entry(cat, p, tree_size(p)) for p in sorted(folder.iterdir())]
    return out


@app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """Show what is under $BALLAST_HOME (default ~/.ballast): models, envs, packages and logs, with sizes."""
    home = home_path()
    entries = cache_entries(home)
    if as_json:
        print(json.dumps({"home": str(home), "entries": [
            {"category": e.category, "name": e.path.name, "path": str(e.path), "bytes": e.size} for e in entries]}))
        return
    console.print(f"BALLAST_HOME: {home}", markup=False)
    t = Table("CATEGORY", "NAME", "SIZE", box=None)
    for e in entries:
        t.add_row(e.category, e.path.name, human(e.size))
    if entries:
        console.print(t)
    t = Table("CATEGORY", "ENTRIES", "SIZE", "WHAT", box=None)
    for cat, what in CATEGORIES.items():
        mine = [e for e in entries if e.category == cat]
        t.add_row(cat, str(len(mine)), human(sum(e.size for e in mine)), what)
    t.add_row("total", str(len(entries)), human(sum(e.size for e in entries)), "")
    console.print(t)


def running_platform(home: Path) -> PlatformClient | None:
    """The platform that saved its credentials in this home, when it answers now."""
    saved = load_profile()
    if not saved.url:
        return None
    try:
        if httpx.get(saved.url + "/api/v1/health", timeout=3, trust_env=False).status_code != 200:
            return None
    except httpx.HTTPError:
        return None
    return PlatformClient(saved.url)


def referenced_packages(c: PlatformClient) -> set[Path]:
    """The package directories of every version the platform knows (refuses on any error)."""
    used = set()
    for d in c.get("/deployments")["data"]:
        for v in c.get(f"/deployments/{d['name']}")["versions"]:
            if v.get("package_path"):
                used.add(Path(v["package_path"]).resolve())
    return used


def _targets(home: Path, chosen: list[str]) -> list[Entry]:
    platform = running_platform(home)
    if platform is not None:
        busy = [c for c in chosen if c != "packages"]
        if busy:
            raise ValueError(f"the platform at {platform.url} is running and its replicas use {', '.join(busy)}; "
                             "stop `ballast up` first, or clean only --packages")
        used = referenced_packages(platform)
        return [e for e in cache_entries(home, chosen)
                if e.path.resolve() not in used and not e.path.name.startswith(".")]
    if "packages" in chosen and (home / "credentials.json").exists():
        raise ValueError("a platform ran from this home and its versions may use these packages: start `ballast up` "
                         "so it can say which are unused, or leave out --packages")
    return cache_entries(home, chosen)


@app.command()
def clean(
    models: Annotated[bool, typer.Option("--models", help="Imported LLM checkpoints.")] = False,
    envs: Annotated[bool, typer.Option("--envs", help="Requirement environments.")] = False,
    packages: Annotated[bool, typer.Option("--packages", help="Package copies no version uses (asks the "
                                                              "running platform).")] = False,
    logs: Annotated[bool, typer.Option("--logs", help="Replica logs.")] = False,
    yes: YesOpt = False,
) -> None:
    """Remove cached files under $BALLAST_HOME (default ~/.ballast); no flag means all four kinds.

    Refuses what a running platform uses; never touches the state database or the saved credentials."""
    flags = {"models": models, "envs": envs, "packages": packages, "logs": logs}
    chosen = [c for c, on in flags.items() if on] or list(flags)
    home = home_path()
    targets = _targets(home, chosen)
    if not targets:
        console.print(f"nothing to remove ({', '.join(chosen)} under {home})", markup=False)
        return
    for e in targets:
        console.print(f"  {e.category:<9} {e.path.name:<40} {human(e.size)}", markup=False)
    total = human(sum(e.size for e in targets))
    confirm(f"remove these {len(targets)} entries ({total})?", yes)
    for e in targets:
        if e.path.is_dir() and not e.path.is_symlink():
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            e.path.unlink(missing_ok=True)
    console.print(f"removed {len(targets)} entries, {total}", markup=False)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="cache", help="List and clean what Ballast keeps under $BALLAST_HOME (~/.ballast).")
