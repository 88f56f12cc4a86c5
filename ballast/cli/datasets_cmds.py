"""`ballast datasets list|show|export|import|delete`: captured and imported examples, over the REST API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from ballast.cli.options import JsonOpt, KeyOpt, UrlOpt, make_console
from ballast.cli.platform_client import PlatformClient

console = make_console()
app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)
NameArg = Annotated[str, typer.Argument(help="Dataset name.")]


def _jsonl(examples: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)


@app.command("list")
def list_(url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Datasets with their number of examples and of corrected ones."""
    data = PlatformClient(url, api_key).get("/datasets")["data"]
    if as_json:
        console.print_json(json.dumps(data))
        return
    t = Table(Column("NAME", no_wrap=True), "EXAMPLES", "CORRECTED", "UPDATED", box=None)
    for d in data:
        t.add_row(d["name"], str(d["examples"]), str(d["corrected"]), (d["updated_at"] or "-")[:19])
    console.print(t)


@app.command()
def show(name: NameArg, limit: Annotated[int, typer.Option(min=1, max=1000, help="Examples shown.")] = 5,
         url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """The first examples of a dataset (a correction shown as the completion)."""
    d = PlatformClient(url, api_key).get(f"/datasets/{name}", params={"limit": limit})
    if as_json:
        console.print_json(json.dumps(d))
        return
    console.print(f"dataset {d['name']}: {d['examples']} examples")
    for e in d["data"]:
        console.print(f"- {e['source']} {e['request_id'] or ''} rating={e['rating']} corrected={e['corrected']}",
                      markup=False)
        for m in e["messages"]:
            console.print(f"    {m['role']}: {m.get('content')}", markup=False)


@app.command()
def export(
    name: NameArg,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Train JSONL file (default: stdout).")]
    = None,
    held_out: Annotated[float, typer.Option(min=0, max=1, help="Share of examples kept out for evaluation.")] = 0.0,
    held_out_file: Annotated[Path | None, typer.Option(help="Where the held-out examples go.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the shuffle that splits.")] = 0,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Write a dataset in OpenAI's chat fine-tuning JSONL format (a correction is the completion)."""
    if held_out > 0 and held_out_file is None:
        raise typer.BadParameter("give --held-out-file for the held-out examples", param_hint="--held-out")
    split = PlatformClient(url, api_key).get(f"/datasets/{name}/export", params={"held_out": held_out, "seed": seed})
    if output is None:
        typer.echo(_jsonl(split["train"]), nl=False)
    else:
        output.write_text(_jsonl(split["train"]))
    if held_out_file is not None:
        held_out_file.write_text(_jsonl(split["held_out"]))
    if output is not None:
        console.print(f"{len(split['train'])} train, {len(split['held_out'])} held-out examples")


@app.command("import")
def import_(name: NameArg, file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL file.")],
            url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Add the examples of a JSONL file in OpenAI's chat fine-tuning format; one bad line imports nothing."""
    out = PlatformClient(url, api_key).post(f"/datasets/{name}/import", {"jsonl": file.read_text()})
    console.print(f"{out['imported']} examples imported into {out['name']}")


@app.command()
def delete(name: NameArg, request_id: Annotated[str | None, typer.Option(help="Only this captured request.")]
           = None, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Delete a dataset, or one captured request of it."""
    path = f"/datasets/{name}" + (f"/records/{request_id}" if request_id else "")
    out = PlatformClient(url, api_key).request("DELETE", path)
    console.print(f"{out['deleted']} examples deleted from {name}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="datasets", help="Datasets: captured traffic, feedback and imported examples.")
