"""`ballast simulate TRACE --pools pools.yaml`: plan capacity offline with the real autoscaler and placement."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ballast.cli.options import make_console
from ballast.sim.names import DEFAULT_POLICIES, NAMES

console = make_console()


def simulate_cmd(
    trace: Annotated[Path, typer.Argument(help="Request trace: JSONL or CSV (t, prompt, output, prefix, "
                                               "prefix_tokens), one request each.")],
    pools: Annotated[Path, typer.Option("--pools", help="Pools file (YAML): pools with capacity, cold starts, "
                                                        "price and outages; the deployment.")],
    policy: Annotated[list[str] | None, typer.Option(
        "--policy", help=f"Placement policy to compare (repeatable): {', '.join(NAMES)}. "
        f"Default: {', '.join(DEFAULT_POLICIES)}.")] = None,
    slo_ttft_ms: Annotated[float, typer.Option(min=1, help="TTFT objective; attainment is the share of all "
                                                          "requests (lost ones miss it) within it.")] = 1000.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Replay a request trace against simulated pools in virtual time, per placement policy: TTFT p50/p99 against
    an SLO, cost, cold starts, and requests lost in failures."""
    from ballast.sim.run import SimError, load, simulate  # here: the simulator loads the whole control plane

    try:
        tr, spec = load(trace, pools)
        rows = simulate(tr, spec, policy or DEFAULT_POLICIES, slo_ttft_ms)
    except SimError as e:
        raise typer.BadParameter(str(e)) from None
    if as_json:
        console.print_json(json.dumps(rows))
        return
    _table(rows)


def _table(rows: list[dict[str, Any]]) -> None:
    t = Table("POLICY", "REQUESTS", "LOST", "RETRIED", "TTFT P50 MS", "TTFT P99 MS", "SLO MET", "COST",
              "COLD STARTS", "PEAK", "REQ/WALL S", box=None)
    for r in rows:
        t.add_row(r["policy"], str(r["requests"]), str(r["lost"]), str(r["retried"]), f"{r['ttft_p50_ms']:g}",
                  f"{r['ttft_p99_ms']:g}", f"{100 * r['slo_attainment']:.2f}%", f"{r['cost']:.2f}",
                  str(r["cold_starts"]), str(r["peak_replicas"]), str(r["requests_per_wall_s"]))
    console.print(t)


def register(root: typer.Typer) -> None:
    root.command("simulate")(simulate_cmd)
