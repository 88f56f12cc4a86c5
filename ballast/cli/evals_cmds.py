"""`ballast evals run|list|show` and `ballast adapters ship`: evals of deployments and adapters on a dataset,
and the gate that ships a better adapter as a canary, over the REST API."""

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
adapters_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)
LONG_S = 3600.0  # an eval of a large dataset on CPU takes long; the server bounds each request


def _scores(s: dict[str, float]) -> str:
    return "  ".join(f"{m}={v:.3f}" for m, v in s.items())


def _print_run(out: dict[str, Any], diff_limit: int) -> None:
    console.print(f"eval {out.get('id', '-')}: {out['dataset']} ({out['split']}), {out['examples']} examples",
                  markup=False)
    for t, s in out["scores"].items():
        failed = out["failed"].get(t, 0)
        console.print(f"  {t}: {_scores(s)}" + (f"  ({failed} failed)" if failed else ""), markup=False)
    if "delta" not in out:
        return
    a, b = out["targets"]
    console.print(f"  delta ({b} − {a}): " + "  ".join(f"{m}={v:+.3f}" for m, v in out["delta"].items()),
                  markup=False)
    differ = [e for e in out["data"] if e["record"] in set(out["disagree"])]
    console.print(f"  {len(differ)} examples differ" + (f" (first {diff_limit})" if len(differ) > diff_limit else ""),
                  markup=False)
    for e in differ[:diff_limit]:
        console.print(f"- record {e['record']}  reference: {e['reference']!r}", markup=False)
        for t in (a, b):
            console.print(f"    {t}: {e[t]['output']!r}  {_scores(e[t]['scores'])}", markup=False)


@app.command()
def run(
    target: Annotated[list[str], typer.Option("--target", "-t", help="chat, chat:3, chat@prod, chat/sql or sql; "
                                              "twice to compare two side by side.")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset name.")],
    metric: Annotated[list[str] | None, typer.Option("--metric", "-m", help="exact, contains, prefix, json_valid, "
                                                     "token_f1 or regex:PATTERN (repeat; default exact).")] = None,
    split: Annotated[str, typer.Option(help="heldout, train or all.")] = "heldout",
    held_out: Annotated[float, typer.Option(min=0, max=1, help="The held-out share of the split.")] = 0.2,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the shuffle that splits.")] = 0,
    limit: Annotated[int | None, typer.Option(min=1, max=5000, help="At most this many examples.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, max=4096, help="max_tokens of each request.")] = 64,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Requests in flight per target.")] = 4,
    show_diff: Annotated[int, typer.Option(min=0, help="Differing examples printed.")] = 20,
    url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Run a dataset's examples through a target via the gateway (batch priority, greedy) and score them."""
    body = {"targets": target, "dataset": dataset, "metrics": metric or ["exact"], "split": split,
            "held_out": held_out, "seed": seed, "limit": limit, "max_tokens": max_tokens, "concurrency": concurrency}
    out = PlatformClient(url, api_key, timeout=LONG_S).post("/evals", body)
    if as_json:
        console.print_json(json.dumps(out))
    else:
        _print_run(out, show_diff)


@app.command("list")
def list_(deployment: Annotated[str | None, typer.Option(help="Only this deployment's evals.")] = None,
          limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
          url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Kept eval results, newest first."""
    params: dict[str, Any] = {"limit": limit} | ({"deployment": deployment} if deployment else {})
    data = PlatformClient(url, api_key).get("/evals", params=params)["data"]
    if as_json:
        console.print_json(json.dumps(data))
        return
    t = Table(Column("ID", no_wrap=True), "WHEN", "DATASET", "EXAMPLES", Column("SCORES"), "JOB", box=None)
    for e in data:
        scores = "; ".join(f"{tg} {_scores(s)}" for tg, s in e.get("scores", {}).items())
        t.add_row(str(e["id"]), (e["ts"] or "")[:19], f"{e.get('dataset')} ({e.get('split')})",
                  str(e.get("examples")), scores, e.get("job_id") or "-")
    console.print(t)


@app.command()
def show(eval_id: Annotated[int, typer.Argument(help="Eval id (`ballast evals list`).")],
         url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """One kept eval: scores, delta, and each example's dataset record with its scores."""
    e = PlatformClient(url, api_key).get(f"/evals/{eval_id}")
    if as_json:
        console.print_json(json.dumps(e))
        return
    console.print(e["message"], markup=False)
    for t, s in e["scores"].items():
        console.print(f"  {t}: {_scores(s)}", markup=False)
    if e.get("delta"):
        console.print("  delta: " + "  ".join(f"{m}={v:+.3f}" for m, v in e["delta"].items()), markup=False)
        console.print(f"  records that differ: {e.get('disagree')}", markup=False)


@adapters_app.command()
def ship(
    deployment: Annotated[str, typer.Argument(help="The deployment whose production the adapter competes with.")],
    adapter_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="A PEFT adapter directory on "
                                                "the platform's machine.")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Evaluated on its held-out split.")],
    metric: Annotated[str, typer.Option("--metric", "-m", help="The metric the gate compares.")] = "exact",
    margin: Annotated[float, typer.Option(min=-1, max=1, help="Ship when candidate − production ≥ this.")] = 0.0,
    name: Annotated[str | None, typer.Option(help="The adapter's name (default: the directory's).")] = None,
    env: Annotated[str, typer.Option(help="The environment it competes in and canaries into.")] = "production",
    canary: Annotated[int, typer.Option(min=1, max=99, help="Canary percent of traffic.")] = 10,
    hold_s: Annotated[float, typer.Option(min=0, help="Seconds the canary is watched before promotion.")] = 60.0,
    max_tokens: Annotated[int, typer.Option(min=1, max=4096, help="max_tokens of each eval request.")] = 64,
    job_id: Annotated[str | None, typer.Option(help="A job id the events name.")] = None,
    max_error_rate_delta: Annotated[float, typer.Option(min=0, max=1, help="Roll back when the canary's error rate "
                                                        "exceeds the stable's by more.")] = 0.05,
    max_latency_ratio: Annotated[float, typer.Option(min=0.0001, help="Roll back when its mean latency exceeds the "
                                                     "stable's times this (plus --latency-slack-s).")] = 2.0,
    latency_slack_s: Annotated[float, typer.Option(min=0)] = 0.05,
    url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Evaluate an adapter against production; if it wins, deploy it as a canary, promoted after the hold."""
    body = {"deployment": deployment, "adapter_path": str(adapter_dir.resolve()), "adapter_name": name or
            adapter_dir.resolve().name, "dataset": dataset, "metric": metric, "margin": margin, "env": env,
            "canary_percent": canary, "hold_s": hold_s, "max_tokens": max_tokens, "job_id": job_id,
            "max_error_rate_delta": max_error_rate_delta, "max_latency_ratio": max_latency_ratio,
            "latency_slack_s": latency_slack_s}
    out = PlatformClient(url, api_key, timeout=LONG_S).post("/adapters/ship", body)
    if as_json:
        console.print_json(json.dumps(out))
        return
    console.print(f"{out['adapter']}: {metric} {out['candidate_score']:.3f} vs production (version "
                  f"{out['production_version']}) {out['production_score']:.3f}, margin {margin:+g}", markup=False)
    if out["decision"] == "canary":
        console.print(f"shipped: version {out['version']} is a {canary}% canary in {env}; promoted after "
                      f"{hold_s:g}s if it holds (`ballast events {deployment}`)", markup=False)
    else:
        console.print(f"rejected: version {out['candidate_version']} stays registered, unserved", markup=False)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="evals", help="Evals: run datasets through deployments and adapters, and compare.")
    root.add_typer(adapters_app, name="adapters", help="LoRA adapters: ship one through the eval gate.")
