"""`ballast fine-tune create|list|show|cancel|events`: fine-tuning jobs through the gateway's OpenAI-compatible
`/v1/fine_tuning/jobs` (the same calls the openai SDK makes), with a live progress bar when following."""

from __future__ import annotations

import json
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from ballast.cli.async_cmds import Gateway
from ballast.cli.options import JsonOpt, KeyOpt, UrlOpt, make_console

console = make_console()
app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)
JobArg = Annotated[str, typer.Argument(help="Job id (ftjob-...).")]
FollowOpt = Annotated[bool, typer.Option("--follow", "-f", help="Show progress until the job ends.")]
TERMINAL = ("succeeded", "failed", "cancelled")
MAX_FOLLOW_S = 7 * 86400.0


class Method(StrEnum):
    supervised = "supervised"
    dpo = "dpo"


def _line(j: dict[str, Any]) -> str:
    b = j.get("ballast") or {}
    return (f"{j['id']}  {j['status']}  model={j['model']}  step={b.get('step')}/{b.get('total_steps') or '?'}  "
            f"fine_tuned_model={j['fine_tuned_model'] or '-'}")


@app.command()
def create(
    model: Annotated[str, typer.Option(help="The LLM deployment whose production checkpoint is the base.")],
    file: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="Training JSONL.")] = None,
    dataset: Annotated[str | None, typer.Option(help="A Ballast dataset (its train split) instead of a file.")]
    = None,
    method: Annotated[Method, typer.Option(help="supervised (LoRA) or dpo (preference pairs).")] = Method.supervised,
    epochs: Annotated[int | None, typer.Option(min=1, max=50)] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, max=256)] = None,
    lr_multiplier: Annotated[float | None, typer.Option(help="Multiplies the base learning rate (2e-4).")] = None,
    suffix: Annotated[str | None, typer.Option(help="In the adapter's name.")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Stop after this many steps.")] = None,
    follow: FollowOpt = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a fine-tuning job (a LoRA adapter for the deployment)."""
    if (file is None) == (dataset is None):
        raise typer.BadParameter("give --file or --dataset", param_hint="--file")
    gw = Gateway(url, api_key)
    if file is not None:
        upload = {"file": (file.name, file.read_bytes())}
        training = gw.call("POST", "/v1/files", files=upload, data={"purpose": "fine-tune"})["id"]
    else:
        training = f"dataset:{dataset}"
    hyper = {k: v for k, v in {"n_epochs": epochs, "batch_size": batch_size,
                               "learning_rate_multiplier": lr_multiplier}.items() if v is not None}
    body: dict[str, Any] = {"model": model, "training_file": training,
                            "method": {"type": method.value, method.value: {"hyperparameters": hyper}}}
    if suffix:
        body["suffix"] = suffix
    if max_steps:
        body["ballast"] = {"max_steps": max_steps}
    j = gw.call("POST", "/v1/fine_tuning/jobs", json=body)
    if as_json and not follow:
        console.print_json(json.dumps(j))
        return
    console.print(_line(j), markup=False)
    if follow:
        _follow(gw, j["id"])


@app.command("list")
def list_(limit: Annotated[int, typer.Option(min=1, max=100)] = 20, url: UrlOpt = None, api_key: KeyOpt = None,
          as_json: JsonOpt = False) -> None:
    """Fine-tuning jobs, newest first."""
    data = Gateway(url, api_key).call("GET", "/v1/fine_tuning/jobs", params={"limit": limit})["data"]
    if as_json:
        console.print_json(json.dumps(data))
        return
    t = Table(Column("ID", no_wrap=True), "STATUS", "MODEL", "METHOD", "STEP", "FINE-TUNED MODEL", box=None)
    for j in data:
        b = j.get("ballast") or {}
        step = f"{b.get('step')}/{b.get('total_steps') or '?'}"
        t.add_row(j["id"], j["status"], j["model"], j["method"]["type"], step, j["fine_tuned_model"] or "-")
    console.print(t)


@app.command()
def show(job_id: JobArg, url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """One job."""
    j = Gateway(url, api_key).call("GET", f"/v1/fine_tuning/jobs/{job_id}")
    if as_json:
        console.print_json(json.dumps(j))
        return
    console.print(_line(j), markup=False)
    if j.get("error"):
        console.print(f"error: {j['error'].get('message')}", markup=False)


@app.command()
def cancel(job_id: JobArg, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Cancel a job (a running worker is stopped)."""
    console.print(_line(Gateway(url, api_key).call("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")), markup=False)


@app.command()
def events(job_id: JobArg, limit: Annotated[int, typer.Option(min=1, max=1000)] = 50, follow: FollowOpt = False,
           url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """A job's events, oldest first (with --follow: a progress bar until it ends)."""
    gw = Gateway(url, api_key)
    data = gw.call("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": limit})["data"]
    for e in reversed(data):
        if e["type"] != "metrics":
            console.print(f"{time.strftime('%H:%M:%S', time.localtime(e['created_at']))} {e['message']}", markup=False)
    if follow:
        _follow(gw, job_id, seen=data[0]["id"] if data else None)


def _follow(gw: Gateway, job_id: str, seen: str | None = None) -> None:
    """Poll the job and its events until it ends: a bar with loss, tokens/s and ETA; messages above it."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[steps]}"),
                   TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s  ETA {task.fields[eta]}"),
                   TimeElapsedColumn(), console=console)
    task = bar.add_task(job_id, total=None, steps="-", loss="-", tps="-", eta="-")
    deadline = time.monotonic() + MAX_FOLLOW_S
    with bar:
        while time.monotonic() < deadline:
            j = gw.call("GET", f"/v1/fine_tuning/jobs/{job_id}")
            new = gw.call("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000})["data"]
            fresh = new[:[e["id"] for e in new].index(seen)] if seen in [e["id"] for e in new] else new
            for e in reversed(fresh):
                if e["type"] == "metrics" and "tokens_per_s" in (e.get("data") or {}):
                    d = e["data"]
                    bar.update(task, completed=d["step"], total=d.get("total_steps"),
                               steps=f"{d['step']}/{d.get('total_steps')}", loss=f"{d.get('loss') or 0:.4f}",
                               tps=f"{d.get('tokens_per_s') or 0:.0f}", eta=f"{d.get('eta_s') or 0:.0f}s")
                else:
                    bar.console.print(e["message"], markup=False)
            seen = new[0]["id"] if new else seen
            if j["status"] in TERMINAL:
                break
            time.sleep(1.0)
    console.print(_line(j), markup=False)
    if j["status"] != "succeeded":
        raise typer.Exit(1)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="fine-tune", help="Fine-tuning jobs: LoRA adapters trained on files or datasets.")
