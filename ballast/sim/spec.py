"""The pools file of `ballast simulate`: simulated pools (capacity, cold starts, price, outages) and the deployment
(replica speed, autoscaling, placement) whose traffic they carry."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ballast.config import AutoscalingConfig, RoutingConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SimPool(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    cloud: str = ""
    region: str = ""
    cost_per_hour: float = Field(0.0, ge=0, description="Price of one replica-hour (billed from start to stop).")
    max_replicas: int | None = Field(None, ge=0)
    cold_start_s: float | tuple[float, float] = Field(
        30.0, description="Start to ready: seconds, or [low, high] drawn uniformly per replica.")
    reliable: bool = Field(True, description="false: spot-like capacity the hedge policy does not count on.")
    outages: list[tuple[float, float]] = Field(
        default_factory=list, description="[down_at_s, up_at_s]: the pool's cluster stops answering; its replicas "
        "are lost and what they were serving is retried elsewhere.")
    default: bool = False

    def cold_range(self) -> tuple[float, float]:
        c = self.cold_start_s
        return (float(c), float(c)) if isinstance(c, (int, float)) else (float(c[0]), float(c[1]))


class SimDeployment(_Strict):
    concurrency: int = Field(8, ge=1, le=4096, description="Requests one replica serves at once.")
    prefill_tokens_per_s: float = Field(20_000.0, gt=0, description="Prompt tokens a replica reads per second.")
    decode_s_per_token: float = Field(0.02, ge=0, description="Time per output token of one request.")
    autoscaling: AutoscalingConfig = Field(default_factory=lambda: AutoscalingConfig(max_replicas=100))
    max_wait_s: float = Field(RoutingConfig().max_wait_s, gt=0,
                              description="A request held this long with no replica free is lost (a 503).")
    tick_s: float = Field(1.0, gt=0, le=60, description="The reconcile interval (autoscaler, failover, placement).")


class HedgePolicy(_Strict):
    reliable_fraction: float = Field(0.3, ge=0, le=1, description="Share of replicas kept on reliable pools.")
    overprovision: float = Field(0.2, ge=0, le=2, description="Extra replicas per replica on unreliable pools.")


class SimSpec(_Strict):
    pools: list[SimPool] = Field(min_length=1)
    deployment: SimDeployment = Field(default_factory=SimDeployment)
    hedge: HedgePolicy = Field(default_factory=HedgePolicy)
    seed: int = 0

    @model_validator(mode="after")
    def _names(self) -> SimSpec:
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError("pool names must be unique")
        return self


def load_spec(path: Path) -> SimSpec:
    return SimSpec.model_validate(yaml.safe_load(path.read_text()) or {})
