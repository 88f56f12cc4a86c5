"""Write the two example traces for `ballast simulate`: a steady diurnal wave and bursty traffic (JSONL).

`python examples/capacity/make_traces.py [--out DIR] [--requests N] [--duration S] [--seed N]`
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ballast.sim.traces import generate, write_trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--duration", type=float, default=7200.0, help="simulated seconds the trace spans")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in ("diurnal", "bursty"):
        path = args.out / f"{kind}.jsonl"
        write_trace(generate(kind, args.requests, args.duration, seed=args.seed), path)
        print(f"wrote {path} ({args.requests} requests over {args.duration:g} s)")


if __name__ == "__main__":
    main()
