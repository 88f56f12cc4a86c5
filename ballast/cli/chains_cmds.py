"""`ballast chains run|deploy`: run a chain (a Python file of `Chainlet` steps) here, or deploy one per step."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ballast.chains import LocalChain, find_entry, load_module
from ballast.chains.deploy import build_packages
from ballast.chains.local import chain_steps
from ballast.chains.serve import KEY_FILE, deployment_name
from ballast.cli.options import KeyOpt, UrlOpt, make_console
from ballast.cli.platform_client import PlatformClient
from ballast.home import ballast_home

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
    chain = LocalChain(find_entry(load_module(path)))
    asyncio.run(_run(chain, inputs, deadline, request_id))


def _chain_key(c: PlatformClient, chain: str, names: list[str], key_file: Path) -> str:
    """The chain's key from the last deploy while it is still active and fits; else a new one.

    Reusing it keeps unchanged steps' packages identical, so a redeploy of an unchanged chain reuses versions.
    """
    label = f"chain {chain}"
    old = key_file.read_text().strip() if key_file.is_file() else ""
    if old:
        for k in c.get("/keys")["data"]:
            if (k["name"] == label and not k["revoked_at"] and old.startswith(k["prefix"])
                    and sorted(k["deployments"] or []) == sorted(names)):
                return old
    return str(c.post("/keys", {"name": label, "scopes": ["inference"], "deployments": names})["key"])


@app.command("deploy")
def deploy(
    path: Annotated[str, typer.Argument(help="The Python file that defines the chain's steps.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Chain name; step Embed deploys as NAME-embed.")],
    out: Annotated[Path | None, typer.Option(help="Where the generated packages go "
                                             "(default $BALLAST_HOME/chains/NAME).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each step to be ready.")] = 900.0,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Deploy each step as its own deployment (dependencies first); steps call each other through the gateway."""
    c = PlatformClient(url, api_key)
    entry = find_entry(load_module(path))
    names = [deployment_name(name, s.__name__) for s in chain_steps(entry)]
    out_dir = (out or ballast_home() / "chains" / name).resolve()
    key = _chain_key(c, name, names, out_dir / names[-1] / KEY_FILE)
    packages = build_packages(path, name, out_dir, c.url, key)
    for pkg in packages:
        r = c.deploy(pkg.path, pkg.deployment, None)
        c.wait_for(r["deployment"], r["version"], None, timeout)
        console.print(f"{pkg.step}: {r['deployment']} version {r['version']} ready")
    entry_pkg = next(p for p in packages if p.entry)
    console.print(f"call it: POST {c.url}/deployments/{entry_pkg.deployment}/predict")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="chains", help="Chains of steps (Chainlets): run them here or deploy them.")
