"""Platform commands (`ballast up`, `deploy`, `promote`, ...): talk to the REST API, never to the store."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ballast.cli.options import JsonOpt, KeyOpt, UrlOpt, YesOpt, confirm, make_console
from ballast.cli.platform_client import PlatformClient

console = make_console()
err = make_console(stderr=True)


def _client(url: str | None, api_key: str | None) -> PlatformClient:
    return PlatformClient(url, api_key)


def deploy(
    path: Annotated[Path, typer.Argument(help="Package directory (with ballast.yaml).")],
    name: Annotated[str | None, typer.Option("--name", "-n", help="Deployment name (default: the package's).")] = None,
    env: Annotated[str | None, typer.Option(
        "--env", "-e", help="Promote to this environment (the first deploy goes to production).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the version serves (or is ready).")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits.")] = 900.0,
    pool: Annotated[list[str] | None, typer.Option(
        "--pool", help="Pin this version's replicas to this pool (repeat for several, in order of preference); "
        "overrides placement.pools of ballast.yaml.")] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Deploy a package as a new immutable version of a deployment (an identical package reuses its version)."""
    c = _client(url, api_key)
    r = c.deploy(path, name, env, pool)
    what = "reused" if r["reused"] else "created"
    pinned = f", pinned to {', '.join(r['pools'])}" if r.get("pools") else ""
    console.print(f"{r['deployment']}: version {r['version']} {what} (package {r['fingerprint'][:12]}{pinned})")
    promo = r.get("promotion")
    target_env = promo["environment"] if promo else None
    if promo:
        console.print(f"  {promo['environment']}: {promo['state']}")
    if wait:
        with err.status(f"waiting for version {r['version']} to be ready..."):
            c.wait_for(r["deployment"], r["version"], target_env, timeout)
        console.print(f"  version {r['version']} is ready" + (f" and serves {target_env}" if target_env else ""))
    elif not promo:
        console.print(f"  promote it with: ballast promote {r['deployment']} --version {r['version']} --env ENV")


def promote(
    name: Annotated[str, typer.Argument(help="Deployment name.")],
    version: Annotated[int, typer.Option("--version", "-v", help="Version number.")],
    env: Annotated[str, typer.Option("--env", "-e", help="Environment.")] = "production",
    canary: Annotated[int | None, typer.Option(help="Give the new version this percent of traffic first.")] = None,
    ramp_s: Annotated[float, typer.Option("--ramp-s", help="Shift the rest stepwise over this many seconds.")] = 0.0,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the pointer has moved.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 900.0,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Point an environment at a version; the pointer moves only once that version has ready replicas."""
    c = _client(url, api_key)
    r = c.post(f"/deployments/{name}/promote", {"version": version, "env": env, "canary": canary, "ramp_s": ramp_s})
    console.print(f"{name} {env}: {r['state']} (version {r['version']})")
    if r["state"] == "pending" and wait:
        with err.status(f"starting version {version}; the pointer moves when it is ready..."):
            c.wait_for(name, version, env, timeout)
        console.print(f"{name} {env}: now version {version}" + (f" ({canary}% canary)" if canary else ""))


def rollback(
    name: Annotated[str, typer.Argument(help="Deployment name.")],
    env: Annotated[str, typer.Option("--env", "-e", help="Environment.")] = "production",
    version: Annotated[int | None, typer.Option("--version", "-v", help="Roll back to this version.")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the pointer has moved.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 900.0,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Point an environment back at its previous version (instant while that version still runs)."""
    c = _client(url, api_key)
    r = c.post(f"/deployments/{name}/rollback", {"env": env, "version": version})
    console.print(f"{name} {env}: {r['state']} (version {r['version']})")
    if r["state"] == "pending" and wait:
        with err.status(f"starting version {r['version']}..."):
            c.wait_for(name, r["version"], env, timeout)
        console.print(f"{name} {env}: now version {r['version']}")


def deployments(url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """List deployments with their environments and replicas."""
    data = _client(url, api_key).get("/deployments")["data"]
    if as_json:
        console.print_json(json.dumps(data))
        return
    t = Table("NAME", "VERSIONS", "ENVIRONMENTS", "REPLICAS (ready/total)", box=None)
    for d in data:
        envs = ", ".join(f"{k}=v{v}" for k, v in sorted(d["environments"].items()) if v is not None) or "-"
        t.add_row(d["name"], str(d["versions"]), envs, f"{d['replicas']['ready']}/{d['replicas']['total']}")
    console.print(t) if data else console.print("no deployments yet (ballast deploy PATH)")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def show(name: Annotated[str, typer.Argument(help="Deployment name.")], url: UrlOpt = None, api_key: KeyOpt = None,
         as_json: JsonOpt = False) -> None:
    """Versions, environments, and replicas with state, pool, port, uptime, restarts and last error."""
    d = _client(url, api_key).get(f"/deployments/{name}")
    if as_json:
        console.print_json(json.dumps(d))
        return
    console.print(f"[bold]{d['name']}[/bold]")
    t = Table("ENVIRONMENT", "VERSION", "TRAFFIC", "PREVIOUS", "PENDING", "SCALE", box=None)
    for e in d["environments"]:
        traffic = ", ".join(f"v{v} {w}%" for v, w in e["traffic"]) or "-"
        pending = f"v{e['pending']['version']}" if e["pending"] else "-"
        scale = f"{e['min_replicas'] if e['min_replicas'] is not None else '-'}..{e['max_replicas'] or '-'}"
        t.add_row(e["name"], f"v{e['version']}" if e["version"] else "-", traffic,
                  f"v{e['previous_version']}" if e["previous_version"] else "-", pending, scale)
    console.print(t)
    t = Table("VERSION", "CREATED", "BY", "DESIRED", "READY", "SCALE", "COLD START", "PACKAGE", "POOLS", "NOTE",
              box=None)
    for v in d["versions"]:
        note = "dev" if v["dev"] else f"retiring at {v['retire_at'][:19]}" if v["retire_at"] else "-"
        cold = f"{v['last_cold_start_s']:.1f}s" if v["last_cold_start_s"] is not None else "-"
        t.add_row(f"v{v['number']}", v["created_at"][:19], v["created_by"], str(v["desired"]),
                  f"{v['replicas']['ready']}/{v['replicas']['total']}", f"{v['min_replicas']}..{v['max_replicas']}",
                  cold, v["fingerprint"][:12], ",".join(v.get("pools") or []) or "any", note)
    console.print(t)
    t = Table("REPLICA", "VERSION", "STATE", "POOL", "PORT", "UPTIME", "RESTARTS", "LAST ERROR", box=None)
    for r in d["replicas"]:
        last = (r["last_error"] or "").splitlines()[0] if r["last_error"] else ""
        t.add_row(r["id"], f"v{r['version']}", r["state"], r["pool"], str(r["port"] or "-"), _age(r["uptime_s"]),
                  str(r["restarts"]), last[:80])
    console.print(t)


def scale(
    name: Annotated[str, typer.Argument(help="Deployment name.")],
    env: Annotated[str, typer.Option("--env", "-e", help="Environment.")] = "production",
    min_replicas: Annotated[int | None, typer.Option("--min", help="Fewest replicas.")] = None,
    max_replicas: Annotated[int | None, typer.Option("--max", help="Most replicas.")] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Set the replica range of an environment's versions."""
    r = _client(url, api_key).post(f"/deployments/{name}/scale", {"env": env, "min": min_replicas,
                                                                 "max": max_replicas})
    console.print(f"{name} {env}: replicas min={r['min_replicas']} max={r['max_replicas']}")


def _env_label(e: dict[str, Any]) -> str:
    serving = f"v{e['version']}" if e["version"] else ""
    pending = f"v{e['pending']['version']} pending" if e["pending"] else ""
    return f"{e['name']} ({', '.join(p for p in (serving, pending) if p)})" if serving or pending else e["name"]


def delete(name: Annotated[str, typer.Argument(help="Deployment name.")], yes: YesOpt = False,
           force: Annotated[bool, typer.Option("--force", help="Delete a chain's step too, marking the chain "
                                               "versions that use it broken.")] = False,
           url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Delete a deployment: its versions and environments go, its replicas drain and stop (asks first)."""
    c = _client(url, api_key)
    d = c.get(f"/deployments/{name}")
    envs = ", ".join(_env_label(e) for e in d["environments"])
    versions = ", ".join(f"v{v['number']}" for v in d["versions"])
    console.print(f"deleting {name} removes:\n  environments: {envs or '-'}\n  versions: {versions or '-'}\n"
                  f"  replicas (drained, then stopped): {len(d['replicas'])}", markup=False)
    confirm(f"delete {name}?", yes)
    out = c.request("DELETE", f"/deployments/{name}", params={"force": "true"} if force else None)
    console.print(f"{name}: deleted")
    for v in out.get("broken_chain_versions", []):
        console.print(f"chain {v['chain']} version {v['version']} is broken (missing: {', '.join(v['missing'])})",
                      markup=False)


def logs(
    name: Annotated[str, typer.Argument(help="Deployment name.")],
    version: Annotated[int | None, typer.Option("--version", "-v", help="Only this version.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    tail: Annotated[int, typer.Option(help="Lines to show first.")] = 100,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Replica stdout/stderr, each line prefixed with its version and replica."""
    params: dict[str, Any] = {"tail": tail, "follow": follow}
    if version is not None:
        params["version"] = version
    for line in _client(url, api_key).stream_lines(f"/deployments/{name}/logs", params):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def events(
    name: Annotated[str | None, typer.Argument(help="Deployment name (default: all).")] = None,
    limit: Annotated[int, typer.Option(help="How many recent events.")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The audit log: deploys, promotions, rollbacks, scaling, replica failures; who and when."""
    c = _client(url, api_key)
    params: dict[str, Any] = {"limit": limit}
    if name:
        params["deployment"] = name
    last = None
    while True:
        data = c.get("/events", params=params if last is None else {**params, "after": last})["data"]
        for e in data:
            last = e["id"]
            if as_json:
                print(json.dumps(e), flush=True)
            else:
                console.print(f"{e['ts'][:19]} {e['deployment']:<16} {e['kind']:<18} {e['actor']:<20} {e['message']}",
                              highlight=False, markup=False, soft_wrap=True)
        if not follow:
            return
        if last is None:
            last = 0
        time.sleep(1.0)


def register(app: typer.Typer) -> None:
    """Add the platform commands to the root CLI."""
    for fn in (deploy, promote, rollback, deployments, show, scale, delete, logs, events):
        app.command()(fn)
