"""Placement policies the simulator compares; each is a `placement:` block of ballast.yaml (run by the real
`control.placement.Placement`), the hedge policy adds a floor of reliable replicas and a spot margin on top.

- `cheapest`: cheapest-first, no spread (`prefer: cheapest, spread: false`): every replica in the cheapest pool
  with room.
- `spread`: even spread over the usable pools (`prefer: spread`).
- `default`: Ballast's default (`prefer: cheapest, spread: 2`): the cheapest pool, but never all in one.
- `ondemand`: pinned to the reliable pools (the baseline the hedge is priced against).
- `hedge` (after SkyServe's SpotHedge): keep `reliable_fraction` of the replicas the autoscaler wants on reliable
  pools (never fewer: they carry traffic while spot capacity is lost and replaced), put the rest cheapest-first
  over at least two pools, and over-provision what runs on unreliable pools by `overprovision` (0.2: one spare
  per five), so a preemption is absorbed by spares while the replacements cold-start. When spot returns,
  rebalancing moves replicas back to it, down to the reliable floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ballast.config import BallastConfig
from ballast.sim.names import NAMES
from ballast.sim.spec import HedgePolicy, SimSpec


@dataclass(frozen=True)
class SimPolicy:
    name: str
    config: BallastConfig  # what Placement reads: placement and autoscaling
    reliable: BallastConfig  # the same pinned to reliable pools (the hedge's floor)
    hedge: HedgePolicy | None = None

    def floor(self, desired: int) -> int:
        """Replicas the policy keeps on reliable pools."""
        return math.ceil(self.hedge.reliable_fraction * desired - 1e-9) if self.hedge else 0

    def target(self, desired: int) -> int:
        """Replicas to run for `desired` (the autoscaler's figure): the hedge adds its spot margin."""
        if not self.hedge:
            return desired
        return desired + math.ceil(self.hedge.overprovision * (desired - self.floor(desired)) - 1e-9)


def make_policy(name: str, spec: SimSpec) -> SimPolicy:
    reliable = [p.name for p in spec.pools if p.reliable]
    placements: dict[str, dict[str, Any]] = {
        "cheapest": {"prefer": "cheapest", "spread": False}, "spread": {"prefer": "spread"}, "hedge": {},
        "default": {}, "ondemand": {"pools": reliable}}
    if name not in placements:
        raise ValueError(f"unknown policy {name!r} (one of {', '.join(NAMES)})")
    if name in ("ondemand", "hedge") and not reliable:
        raise ValueError(f"policy {name!r} needs a pool with reliable: true")
    auto = spec.deployment.autoscaling.model_dump()
    cfg = BallastConfig.model_validate({"name": "sim", "autoscaling": auto, "placement": placements[name]})
    rel = BallastConfig.model_validate({"name": "sim", "autoscaling": auto,
                                        "placement": {"pools": reliable or [spec.pools[0].name], "spread": False}})
    return SimPolicy(name, cfg, rel, spec.hedge if name == "hedge" else None)
