"""`ballast simulate`: the real autoscaler, placement and failover decision in virtual time over a trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ballast.sim.engine import Simulation
from ballast.sim.run import simulate
from ballast.sim.spec import SimSpec
from ballast.sim.traces import generate, read_trace, write_trace

ROOT = Path(__file__).resolve().parents[2]


def pools(outage: bool = True, **deployment: Any) -> dict[str, Any]:
    return {
        "pools": [
            {"name": "spot", "cost_per_hour": 1.0, "max_replicas": 40, "cold_start_s": [20, 40], "reliable": False,
             "outages": [[600, 900]] if outage else []},
            {"name": "ondemand", "cost_per_hour": 3.0, "max_replicas": 40, "cold_start_s": 20, "reliable": True}],
        "deployment": {"concurrency": 4, "max_wait_s": 30, "autoscaling": {
            "min_replicas": 4, "max_replicas": 30, "concurrency_target": 3, "window_s": 30,
            "scale_down_delay_s": 120}, **deployment},
        "seed": 1}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ballast.cli.main", "simulate", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "200"})


def test_the_cli_gives_sensible_deterministic_results(tmp_path: Path) -> None:
    trace, spec = tmp_path / "t.jsonl", tmp_path / "pools.yaml"
    write_trace(generate("bursty", 4000, 1800, seed=3), trace)
    spec.write_text(yaml.safe_dump(pools()))
    runs = [cli(str(trace), "--pools", str(spec), "--policy", "cheapest", "--policy", "ondemand", "--json",
                "--slo-ttft-ms", "500") for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    a, b = ([{k: v for k, v in row.items() if k not in ("wall_s", "requests_per_wall_s")} for row in
             json.loads(r.stdout)] for r in runs)
    assert a == b  # a fixed seed: the same figures
    cheapest, ondemand = a
    for row in a:
        assert row["requests"] == 4000 and row["served"] + row["lost"] == 4000
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"] and 0 <= row["slo_attainment"] <= 1
        assert row["slo_ttft_ms"] == 500 and row["cold_starts"] >= 4
    assert ondemand["replica_hours"]["spot"] == 0 and ondemand["retried"] == 0  # pinned to reliable capacity
    assert cheapest["replica_hours"]["spot"] > cheapest["replica_hours"]["ondemand"]
    assert cheapest["cost"] < ondemand["cost"]
    table = cli(str(trace), "--pools", str(spec))
    assert table.returncode == 0 and all(p in table.stdout for p in ("cheapest", "spread", "hedge"))


def test_bad_input_is_one_line_naming_it(tmp_path: Path) -> None:
    spec = tmp_path / "pools.yaml"
    spec.write_text(yaml.safe_dump(pools()))
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"t": 1, "prompt": 10}\n')
    r = cli(str(trace), "--pools", str(spec))
    assert r.returncode != 0 and "needs t, prompt and output" in r.stderr and "Traceback" not in r.stderr
    write_trace(generate("diurnal", 50, 60), trace)
    r = cli(str(trace), "--pools", str(spec), "--policy", "random")
    assert r.returncode != 0 and "unknown policy 'random'" in r.stderr
    spec.write_text("pools: [{name: a, cost_per_hour: -1}]\n")
    r = cli(str(trace), "--pools", str(spec))
    assert r.returncode != 0 and "pools.0.cost_per_hour" in r.stderr and "Traceback" not in r.stderr


def test_csv_traces_read_the_same() -> None:
    tr = generate("diurnal", 200, 300, seed=5)
    lines = ["t,prompt,output,prefix,prefix_tokens"]
    names = {v: k for k, v in tr.names.items()}
    for i in range(len(tr)):
        px = names.get(tr.prefix[i], "")
        lines.append(f"{tr.t[i]},{tr.prompt[i]},{tr.output[i]},{px},{tr.prefix_tokens[i] if px else ''}")
    path = ROOT / "tests" / "sim" / "_t.csv"
    try:
        path.write_text("\n".join(lines) + "\n")
        back = read_trace(path)
    finally:
        path.unlink()
    assert back.t == tr.t and back.prompt == tr.prompt and back.prefix_tokens == tr.prefix_tokens


def test_a_pool_outage_loses_nothing_when_spread_or_hedged_and_hurts_cheapest_first() -> None:
    tr = generate("diurnal", 6000, 1800, seed=2)
    rows = {r["policy"]: r for r in simulate(tr, SimSpec.model_validate(pools()), ("cheapest", "spread", "hedge"),
                                             slo_ttft_ms=500)}
    assert all(r["pool_downs"] == 1 for r in rows.values())
    for name in ("spread", "hedge"):
        assert rows[name]["lost"] == 0, rows[name]
    c = rows["cheapest"]
    # Every replica was on spot: the outage takes them all; what they served is retried and waits for cold starts.
    assert c["lost"] > 0 or c["ttft_p99_ms"] > 2 * max(rows["spread"]["ttft_p99_ms"], rows["hedge"]["ttft_p99_ms"])
    assert c["slo_attainment"] < min(rows["spread"]["slo_attainment"], rows["hedge"]["slo_attainment"])
    # Without the outage nothing is lost or retried by any of them.
    calm = simulate(tr, SimSpec.model_validate(pools(outage=False)), ("cheapest", "spread", "hedge"))
    assert all(r["lost"] == 0 and r["retried"] == 0 and r["pool_downs"] == 0 for r in calm)


def test_the_real_autoscaler_and_placement_decide() -> None:
    tr = generate("bursty", 3000, 1200, seed=4)
    base = Simulation(SimSpec.model_validate(pools(outage=False)), "cheapest").run(tr)
    spec = pools(outage=False)
    spec["deployment"]["autoscaling"]["concurrency_target"] = 1
    eager = Simulation(SimSpec.model_validate(spec), "cheapest").run(tr)
    assert eager["cost"] > base["cost"] and eager["cold_starts"] != base["cold_starts"]
    # Cheapest-first with spot room: nothing on on-demand; the default (cheapest, spread over two) puts one there.
    assert base["replica_hours"]["ondemand"] == 0
    default = Simulation(SimSpec.model_validate(pools(outage=False)), "default").run(tr)
    assert default["replica_hours"]["ondemand"] > 0
    sim = Simulation(SimSpec.model_validate(pools(outage=False)), "hedge")
    sim.run(tr)
    assert sum(len(v) for n, v in sim.members.items() if n == "ondemand") >= sim.policy.floor(sim.desired)
