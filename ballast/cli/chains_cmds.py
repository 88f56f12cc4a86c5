"""`ballast chains run`: run a chain (a Python file of `Chainlet` steps) in this process."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer

from ballast.chains import LocalChain, find_entry, load_module

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


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="chains", help="Chains of steps (Chainlets): run them locally.")
