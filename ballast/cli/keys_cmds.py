"""`ballast keys create|list|revoke` and `ballast usage`: API keys and metering, over the REST API."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from ballast.cli.options import JsonOpt, KeyOpt, UrlOpt, make_console
from ballast.cli.platform_client import PlatformClient

console = make_console()
app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)


class Scope(StrEnum):
    inference = "inference"
    metrics = "metrics"
    admin = "admin"
    capture = "capture"  # may send x-ballast-capture (with inference)
    fine_tune = "fine_tune"  # may create, list and cancel its own fine-tuning jobs


class Period(StrEnum):
    day = "day"
    month = "month"


def _limits(k: dict[str, Any]) -> str:
    parts = []
    if k["rpm"]:
        parts.append(f"{k['rpm']} req/min")
    if k["tpm"]:
        parts.append(f"{k['tpm']} tok/min")
    if k["token_budget"]:
        parts.append(f"{k['token_budget']} tok/{k['budget_per']}")
    return ", ".join(parts) or "-"


@app.command()
def create(
    scope: Annotated[list[Scope], typer.Option("--scope", "-s", help="inference, metrics, admin, capture.")],
    name: Annotated[str, typer.Option("--name", "-n", help="A label: who or what uses the key.")] = "",
    deployments: Annotated[str | None, typer.Option(help="Comma-separated deployments it may use (default all).")]
    = None,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens (prompt + completion) per minute.")] = None,
    token_budget: Annotated[int | None, typer.Option("--token-budget", help="Tokens per period.")] = None,
    per: Annotated[Period, typer.Option("--per", help="Budget period (UTC).")] = Period.month,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key. The secret is printed once and never stored: keep it."""
    body = {"name": name, "scopes": [s.value for s in scope], "rpm": rpm, "tpm": tpm, "token_budget": token_budget,
            "per": per.value,
            "deployments": [d.strip() for d in deployments.split(",") if d.strip()] if deployments else None}
    k = PlatformClient(url, api_key).post("/keys", body)
    if as_json:
        print(json.dumps(k))
        return
    console.print(f"key {k['id']} ({', '.join(k['scopes'])}; deployments: "
                  f"{', '.join(k['deployments']) if k['deployments'] is not None else 'all'}; limits: {_limits(k)})")
    console.print("secret (shown once):")
    print(k["key"])


@app.command("list")
def list_(
    all_: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List API keys (their prefixes, never the secrets)."""
    data = PlatformClient(url, api_key).get("/keys", params={"include_revoked": all_})["data"]
    if as_json:
        console.print_json(json.dumps(data))
        return
    t = Table(Column("ID", no_wrap=True), "NAME", Column("PREFIX", no_wrap=True), "SCOPES", "DEPLOYMENTS", "LIMITS",
              "CREATED", "REVOKED", box=None)
    for k in data:
        t.add_row(k["id"], k["name"] or "-", k["prefix"], ",".join(k["scopes"]),
                  ",".join(k["deployments"]) if k["deployments"] is not None else "all", _limits(k),
                  (k["created_at"] or "")[:16], (k["revoked_at"] or "-")[:16])
    console.print(t)


@app.command()
def revoke(
    key: Annotated[str, typer.Argument(help="Key id (key-...) or its shown prefix.")],
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Revoke a key; the gateway refuses it within a second."""
    k = PlatformClient(url, api_key).request("DELETE", f"/keys/{key}")
    console.print(f"key {k['id']} revoked at {k['revoked_at']}")


def usage(
    key: Annotated[str | None, typer.Option("--key", help="Only this key (id or prefix).")] = None,
    deployment: Annotated[str | None, typer.Option("--deployment", "-d", help="Only this deployment.")] = None,
    since: Annotated[str | None, typer.Option(help="From this UTC time (ISO 8601, e.g. 2026-11-01 or "
                                                   "2026-11-01T12:00).")] = None,
    group: Annotated[str, typer.Option(help="hour (every row), key or deployment.")] = "hour",
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Requests, tokens and errors per key, deployment, version and hour (prompts and outputs are never kept)."""
    params = {k: v for k, v in {"key": key, "deployment": deployment, "since": since, "group": group}.items() if v}
    data = PlatformClient(url, api_key).get("/usage", params=params)["data"]
    if as_json:
        console.print_json(json.dumps(data))
        return
    cols = [c for c in ("hour", "key_id", "deployment", "version") if data and c in data[0]] or ["hour"]
    t = Table(*[c.upper() for c in cols], "REQUESTS", "PROMPT", "COMPLETION", "CACHED", "ERRORS", box=None)
    for r in data:
        t.add_row(*[str(r[c])[:19] for c in cols], *(str(r[c]) for c in ("requests", "prompt_tokens",
                                                                        "completion_tokens", "cached_tokens",
                                                                        "errors")))
    console.print(t) if data else console.print("no usage recorded")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="keys", help="Create, list and revoke API keys.")
    root.command()(usage)
