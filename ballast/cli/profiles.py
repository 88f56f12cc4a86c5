"""Named profiles: several platforms (a laptop's, a team's remote one) from one CLI.

`$BALLAST_HOME/profiles.json` (mode 0600, it holds API keys) maps names to `{url, api_key}` and says
which one is current. The `default` profile is the one `ballast up` saves in `credentials.json`; a
profile named on the command line (`--profile`, `BALLAST_PROFILE`) or made current with
`ballast profiles use` replaces it. The key of a profile is only sent to its own URL.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ballast.cli.credentials import DEFAULT_PROFILE, check_profile_name, profiles_path, read_profiles
from ballast.cli.options import JsonOpt, make_console

console = make_console()
app = typer.Typer(help="Named platform profiles (URL + API key) in $BALLAST_HOME/profiles.json.",
                  no_args_is_help=True, rich_markup_mode=None)


def _write(data: dict[str, Any]) -> Path:
    """Replace the profiles file atomically; it is created 0600 and never readable by others."""
    path = profiles_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Profile name (lowercase, digits, dashes).")],
    url: Annotated[str, typer.Option("--url", help="Platform URL, e.g. https://ballast.example.com:8000.")],
    api_key: Annotated[str | None, typer.Option("--api-key", help="API key for that platform.")] = None,
    use: Annotated[bool, typer.Option("--use", help="Make it the current profile.")] = False,
    ca_cert: Annotated[Path | None, typer.Option(
        "--ca-cert", help="PEM file to verify the platform's TLS certificate (self-signed or a private CA).")] = None,
) -> None:
    """Add (or replace) a profile."""
    check_profile_name(name)
    if "://" not in url:
        raise ValueError(f"--url {url!r}: give the scheme too (https://... or http://...)")
    if ca_cert is not None and not ca_cert.is_file():
        raise ValueError(f"--ca-cert {ca_cert}: no such file")
    data = read_profiles()
    data["profiles"][name] = {"url": url.rstrip("/"), **({"api_key": api_key} if api_key else {}),
                              **({"ca_cert": str(ca_cert.resolve())} if ca_cert else {})}
    if use:
        data["current"] = name
    path = _write(data)
    console.print(f"profile {name}: {url}" + (" (current)" if use else "") + f"; saved to {path}", markup=False)


@app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """Every profile, its URL, whether it has a key, and which is current."""
    data = read_profiles()
    current = data.get("current") or DEFAULT_PROFILE
    rows = [{"name": n, "url": p.get("url"), "api_key": bool(p.get("api_key")), "current": n == current}
            for n, p in sorted(data["profiles"].items())]
    if as_json:
        console.print_json(data=rows)
        return
    table = Table("", "NAME", "URL", "KEY", box=None)
    for r in rows:
        table.add_row("*" if r["current"] else "", r["name"], r["url"] or "", "yes" if r["api_key"] else "no")
    if not rows:
        console.print("no profiles (add one with `ballast profiles add NAME --url URL --api-key KEY`)")
        return
    console.print(table)


@app.command("use")
def use(name: Annotated[str, typer.Argument(help="Profile name, or `default` for the platform `ballast up` saved.")]
        ) -> None:
    """Make a profile the current one (what every command uses without --profile)."""
    data = read_profiles()
    if name != DEFAULT_PROFILE and name not in data["profiles"]:
        raise ValueError(f"unknown profile {name!r}; see `ballast profiles list`")
    data["current"] = name
    _write(data)
    console.print(f"current profile: {name}", markup=False)


@app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="Profile name.")]) -> None:
    """Remove a profile (the current one falls back to `default`)."""
    data = read_profiles()
    if name not in data["profiles"]:
        raise ValueError(f"unknown profile {name!r}; see `ballast profiles list`")
    del data["profiles"][name]
    if data.get("current") == name:
        data["current"] = DEFAULT_PROFILE
    _write(data)
    console.print(f"profile {name} removed", markup=False)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="profiles")
