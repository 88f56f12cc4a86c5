"""bench/simulator.py drives the real autoscaler, placement and failover decision in virtual time."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from simulator import DEFAULT, Sim, trace


def test_a_pool_outage_moves_replicas_to_the_other_pool_within_its_capacity() -> None:
    spec = {**DEFAULT, "pools": [{"name": "local", "max_replicas": 3, "cold_start_s": 2.0},
                                 {"name": "spot", "max_replicas": 3, "cold_start_s": 2.0, "outages": [[60, 120]]}]}
    sim = Sim(spec)
    sim.run(trace("diurnal", 180, 5.0), 180)
    by_t = {s["t"]: s for s in sim.timeline}
    assert by_t[50]["ready"] == {"local": 1, "spot": 1} and not by_t[50]["down"]  # min 2, spread
    assert by_t[70]["down"] == ["spot"] and by_t[70]["ready"]["spot"] == 0 and by_t[70]["ready"]["local"] == 2
    assert not by_t[140]["down"]  # back after its outage (and the retry backoff)
    assert sim.failed == 0 and sim.cold_starts >= 3
