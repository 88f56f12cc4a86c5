"""`ballast pools add|list|drain|remove`: capacity pools (local process sets, Ray clusters), over the REST API."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from ballast.cli.options import JsonOpt, KeyOpt, UrlOpt, make_console
from ballast.cli.platform_client import PlatformClient

console = make_console()
app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)
NameArg = Annotated[str, typer.Argument(help="Pool name.")]


def _labels(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise typer.BadParameter(f"{item!r}: use KEY=VALUE", param_hint="--label")
        out[k] = v
    return out


def _health(p: dict[str, Any]) -> str:
    if p["healthy"]:
        return "healthy"
    retry = f"; retry at {p['retry_at'][11:19]}" if p.get("retry_at") else ""
    return f"down ({p['reason']}{retry})"


@app.command()
def add(
    name: NameArg,
    ray: Annotated[str | None, typer.Option("--ray", help="Address (host:port) of a Ray cluster's head: a Ray "
                                                          "pool. Without it, a pool of local processes.")] = None,
    region: Annotated[str, typer.Option(help="Where the pool is (shown, and a label to place by).")] = "",
    label: Annotated[list[str] | None, typer.Option("--label", help="KEY=VALUE (repeatable).")] = None,
    max_replicas: Annotated[int | None, typer.Option(help="Most replicas placed in the pool (default: what fits).")]
    = None,
    cloud: Annotated[str, typer.Option(help="Which cloud the pool is in (shown).")] = "",
    cost_per_hour: Annotated[float | None, typer.Option(help="Price of one replica-hour; placement fills the "
                                                              "cheapest healthy pool first.")] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Add a capacity pool; new replicas spread over every healthy pool (or the ones a deployment pins)."""
    body = {"name": name, "ray_address": ray, "region": region,
            "labels": _labels(label or []), "max_replicas": max_replicas,
            "cloud": cloud, "cost_per_hour": cost_per_hour}
    p = PlatformClient(url, api_key).post("/pools", body)
    console.print(f"pool {p['name']} added ({p['kind']}{' at ' + p['address'] if p['address'] else ''})")


def _cost(c: float | None) -> str:
    return "-" if c is None else f"{c:g}"


@app.command("list")
def list_(url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Pools with their kind, region, capacity, state, health and replicas."""
    data = PlatformClient(url, api_key).get("/pools")["data"]
    if as_json:
        console.print_json(json.dumps(data))
        return
    t = Table(Column("NAME", no_wrap=True), "KIND", "ADDRESS", "REGION", "CLOUD", "COST/H", "CAPACITY", "STATE",
              "HEALTH", "REPLICAS", box=None)
    for p in data:
        t.add_row(p["name"] + (" (default)" if p["default"] else ""), p["kind"], p["address"] or "-",
                  p["region"] or "-", p.get("cloud") or "-", _cost(p.get("cost_per_hour")),
                  str(p["max_replicas"]) if p["max_replicas"] is not None else "-", p["state"],
                  _health(p), f"{p['replicas']['ready']}/{p['replicas']['total']}")
    console.print(t)


@app.command()
def drain(
    name: NameArg,
    undo: Annotated[bool, typer.Option("--undo", help="Take replicas again.")] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Stop placing replicas in a pool and move its replicas out (each once its replacement serves)."""
    p = PlatformClient(url, api_key).post(f"/pools/{name}/drain", {"undo": undo})
    console.print(f"pool {p['name']} {p['state']}")


@app.command()
def remove(name: NameArg, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Remove an empty pool (drain it first)."""
    PlatformClient(url, api_key).request("DELETE", f"/pools/{name}")
    console.print(f"pool {name} removed")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="pools", help="Capacity pools: where replicas run, and failover between them.")
