"""Capacity simulator benchmark: `ballast simulate`'s engine at internet scale, and the policy table.

`python bench/simulator.py [--requests 1000000] [--quick]`

1. Speed: a million requests (a diurnal wave over 15 simulated minutes) on pools big enough for more than a
   thousand replicas, per policy: simulated requests per wall-clock second (whole runs, report included; median
   and min-max over the policies) and the peak replica count.
2. Policy table: the two example traces (`examples/capacity/make_traces.py`: steady diurnal and bursty, 100,000
   requests over two hours each) against `examples/capacity/pools.yaml` (spot with two outages, on-demand at
   about 3x the price): cost, TTFT p50/p99 and SLO attainment, lost and retried requests, cold starts, for
   cheapest-first, spread, the hedge, and on-demand only (the baseline the hedge is priced against; SkyServe
   reports 43% lower cost than on-demand only for its spot hedging).

Writes bench/results/simulator.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from ballast.sim.run import simulate
from ballast.sim.spec import SimSpec, load_spec
from ballast.sim.traces import generate

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("cheapest", "spread", "hedge", "ondemand")
SLO_MS = 2000.0


def big_spec(base: SimSpec) -> SimSpec:
    """The example pools scaled up: room for thousands of replicas."""
    d = base.model_dump()
    for p in d["pools"]:
        p["max_replicas"] = 2000
    d["deployment"]["autoscaling"].update(max_replicas=3000, min_replicas=50, concurrency_target=4)
    d["pools"][0]["outages"] = [[400, 600]]
    return SimSpec.model_validate(d)


def speed(base: SimSpec, requests: int) -> dict[str, Any]:
    trace = generate("diurnal", requests, 900.0, seed=1)
    rows = simulate(trace, big_spec(base), POLICIES, SLO_MS)
    rates = [r["requests_per_wall_s"] for r in rows]
    return {"requests": requests, "simulated_s": 900.0,
            "peak_replicas": {r["policy"]: r["peak_replicas"] for r in rows},
            "requests_per_wall_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates)},
            "wall_s": {r["policy"]: r["wall_s"] for r in rows}, "runs": rows}


def table(base: SimSpec, requests: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("diurnal", "bursty"):
        rows = {r["policy"]: r for r in simulate(generate(kind, requests, 7200.0, seed=0), base, POLICIES, SLO_MS)}
        ondemand = rows["ondemand"]["cost"]
        for r in rows.values():
            r["cost_vs_ondemand"] = round(r["cost"] / ondemand, 3) if ondemand else None
        out[kind] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1_000_000, help="requests in the speed run")
    ap.add_argument("--quick", action="store_true", help="100,000 requests in the speed run; no file written")
    args = ap.parse_args()
    base = load_spec(ROOT / "examples" / "capacity" / "pools.yaml")
    result = {"speed": speed(base, 100_000 if args.quick else args.requests), "slo_ttft_ms": SLO_MS,
              "policies": table(base, 100_000)}
    s = result["speed"]
    print(f"speed: {s['requests']} requests, peak replicas {s['peak_replicas']}: "
          f"{s['requests_per_wall_s']['median']:.0f} simulated requests per wall second "
          f"(min {s['requests_per_wall_s']['min']:.0f}, max {s['requests_per_wall_s']['max']:.0f})")
    for kind, rows in result["policies"].items():
        for r in rows.values():
            print(f"{kind:8} {r['policy']:9} cost {r['cost']:8.2f} ({r['cost_vs_ondemand']:.2f}x on-demand) "
                  f"SLO {100 * r['slo_attainment']:6.2f}% p50 {r['ttft_p50_ms']:8.1f} ms "
                  f"p99 {r['ttft_p99_ms']:9.1f} ms "
                  f"lost {r['lost']:5} retried {r['retried']:5} cold starts {r['cold_starts']}")
    if not args.quick:
        out = ROOT / "bench" / "results" / "simulator.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
