"""`ballast chains run|deploy`: run a chain (a Python file of `Chainlet` steps) here, or deploy one per step."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ballast.cli.options import KeyOpt, UrlOpt, make_console
from ballast.cli.platform_client import PlatformClient
from ballast.home import ballast_home

if TYPE_CHECKING:
    from ballast.chains import LocalChain
    from ballast.chains.deploy import StepPackage

console = make_console()

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)


def _json(value: Any) -> str:
    return json.dumps(value, default=lambda o: o.model_dump(mode="json") if hasattr(o, "model_dump") else str(o))


async def _run(chain: LocalChain, inputs: dict[str, Any], deadline_s: float | None, request_id: str | None) -> None:
    if chain.streams:
        async for item in chain.stream(inputs, request_id=request_id, deadline_s=deadline_s):
            typer.echo(_json(item))
        return
    typer.echo(_json(await chain.call(inputs, request_id=request_id, deadline_s=deadline_s)))


@app.command("run")
def run(
    path: Annotated[str, typer.Argument(help="The Python file that defines the chain's steps.")],
    input_json: Annotated[str, typer.Option("--input", "-i", help="The entry step's arguments as a JSON object.")]
    = "{}",
    deadline: Annotated[float | None, typer.Option("--deadline", help="Seconds the whole chain may take.")] = None,
    request_id: Annotated[str | None, typer.Option("--request-id", help="Default: a fresh id.")] = None,
) -> None:
    """Run the whole chain in this process and print the entry step's result (one JSON line per streamed item)."""
    inputs = json.loads(input_json)
    if not isinstance(inputs, dict):
        raise typer.BadParameter("--input must be a JSON object of the entry step's arguments")
    from ballast.chains import LocalChain, find_entry, load_module  # here: chains load aiohttp, slow to import

    chain = LocalChain(find_entry(load_module(path)))
    asyncio.run(_run(chain, inputs, deadline, request_id))


@app.command("deploy")
def deploy(
    path: Annotated[str, typer.Argument(help="The Python file that defines the chain's steps.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Chain name; step Embed deploys as NAME-embed.")],
    env: Annotated[str, typer.Option(help="The environment the new chain version serves.")] = "production",
    out: Annotated[Path | None, typer.Option(help="Where the generated packages go "
                                             "(default $BALLAST_HOME/chains/NAME).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each step to be ready.")] = 900.0,
    via_gateway: Annotated[bool, typer.Option("--via-gateway", help="Calls between steps go through the gateway "
                                              "(metered per step), not straight to the steps' replicas.")] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Deploy each step as its own deployment (dependencies first), record them as one chain version and
    promote it to ENV; steps call each other through the gateway with a key the platform issues."""
    from ballast.chains.deploy import build_packages  # here: chains load aiohttp, slow to import

    c = PlatformClient(url, api_key)
    out_dir = (out or ballast_home() / "chains" / name).resolve()

    def upload(pkg: StepPackage) -> int:
        return int(c.deploy(pkg.path, pkg.deployment, None)["version"])

    built = build_packages(path, name, out_dir, c.url, upload, via_gateway)
    entry = next(p for p, _ in built if p.entry)
    steps = [{"step": p.step, "deployment": p.deployment, "version": v} for p, v in built]
    version = c.post(f"/chains/{name}/versions", {"entry": entry.deployment, "steps": steps})
    c.post(f"/chains/{name}/promote", {"version": version["version"], "env": env})
    for p, v in built:
        c.wait_for(p.deployment, v, env, timeout)
        console.print(f"{p.step}: {p.deployment} version {v} ready")
    reused = " (unchanged: reused)" if version["reused"] else ""
    console.print(f"chain {name} version {version['version']}{reused} serves {env}")
    route = "run" if env == "production" else f"environments/{env}/run"
    console.print(f"call it: POST {c.url}/chains/{name}/{route}")


def _show(result: dict[str, Any]) -> None:
    for st in result["steps"]:
        console.print(f"{st['step']}: {st['deployment']} version {st['version']} ({st.get('state', '')})")
    console.print(f"chain {result['chain']}: {result['environment']} -> version {result['version']}")


@app.command("promote")
def promote(
    name: Annotated[str, typer.Argument(help="The chain.")],
    version: Annotated[int | None, typer.Option("--version", help="Chain version (default: the newest).")] = None,
    env: Annotated[str, typer.Option(help="Environment to move.")] = "production",
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Move ENV of the chain and of every step to a chain version, together."""
    _show(PlatformClient(url, api_key).post(f"/chains/{name}/promote", {"version": version, "env": env}))


@app.command("rollback")
def rollback(
    name: Annotated[str, typer.Argument(help="The chain.")],
    env: Annotated[str, typer.Option(help="Environment to move back.")] = "production",
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Point ENV of the chain and of every step back at the chain version it served before."""
    _show(PlatformClient(url, api_key).post(f"/chains/{name}/rollback", {"env": env}))


@app.command("rotate-key")
def rotate_key(
    name: Annotated[str, typer.Argument(help="The chain.")],
    grace: Annotated[float, typer.Option("--grace", help="Seconds the current internal key stays valid.")] = 300.0,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Issue the chain's next internal key (calls between its steps); the current one is revoked after --grace,
    while running step replicas pick up the new one. No secret is shown: only the platform and its steps hold it."""
    r = PlatformClient(url, api_key).post(f"/chains/{name}/rotate-key", {"grace_s": grace})
    console.print(f"chain {name}: internal key rotated (generation {r['generation']}, key {r['key_id']}); "
                  f"{r['previous_key_id']} is revoked at {r['previous_revoked_at']}", markup=False)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="chains", help="Chains of steps (Chainlets): run them here or deploy them.")
