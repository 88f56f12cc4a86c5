"""REST routes for capacity pools: `GET/POST /api/v1/pools`, `POST /api/v1/pools/{name}/drain`,
`DELETE /api/v1/pools/{name}`. Changes take effect on the reconciler's next tick (woken at once)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from ballast.control.pools import PoolStore
from ballast.platform.auth import Actor
from ballast.platform.openapi import CheckedJSONRoute, errors
from ballast.platform.schemas import NAME

Name = Annotated[str, PathParam(pattern=NAME, max_length=63)]
RAY_ADDRESS = r"^(ray://)?[A-Za-z0-9.-]{1,253}:[0-9]{1,5}$"
LABEL = r"^[A-Za-z0-9_.-]{1,63}$"


class PoolRequest(BaseModel):
    name: str = Field(pattern=NAME, max_length=63)
    ray_address: str | None = Field(None, pattern=RAY_ADDRESS, description="A Ray pool: replicas are actors on the "
                                    "Ray cluster whose head is here (host:port). Without it, a pool of processes on "
                                    "the platform's machine.")
    region: str = Field("", max_length=63, pattern=r"^[A-Za-z0-9_.-]*$")
    labels: dict[Annotated[str, Field(pattern=LABEL)], Annotated[str, Field(max_length=255)]] = Field(
        # patternProperties alone would let a schema-valid body hold any other key: say that none may.
        default_factory=dict, max_length=32, json_schema_extra={"additionalProperties": False})
    max_replicas: int | None = Field(None, ge=1, le=100_000, strict=True, description="Capacity; unset: what fits.")
    cloud: str = Field("", max_length=63, pattern=r"^[A-Za-z0-9_.-]*$", description="Which cloud (shown).")
    cost_per_hour: float | None = Field(None, ge=0, le=1_000_000, allow_inf_nan=False, strict=True,
                                        description="Price of one replica-hour here; placement fills cheap pools "
                                        "first. Unset: not priced (ranked as free, like your own machine).")


class DrainRequest(BaseModel):
    undo: bool = Field(False, strict=True, description="Make a draining pool take replicas again.")


def router(pools: PoolStore, changed: Callable[[Any], Any]) -> APIRouter:
    api = APIRouter(prefix="/api/v1", route_class=CheckedJSONRoute, tags=["pools"])

    @api.get("/pools")
    def list_pools(_who: Actor) -> dict[str, Any]:
        """Pools with their kind, region, capacity, state (active, draining), health and replicas."""
        return {"data": pools.list()}

    @api.post("/pools", status_code=201, responses=errors(409))
    def add_pool(body: PoolRequest, who: Actor) -> dict[str, Any]:
        """A new pool; replicas are placed in it from the next reconcile on."""
        kind = "ray" if body.ray_address else "local"
        return changed(pools.add(body.name, kind, body.ray_address, body.region, body.labels, body.max_replicas,
                                 actor=who, cloud=body.cloud, cost_per_hour=body.cost_per_hour))

    @api.post("/pools/{name}/drain", responses=errors(404))
    def drain_pool(name: Name, body: DrainRequest, who: Actor) -> dict[str, Any]:
        """Stop placing replicas in the pool and move its replicas out (each once its replacement serves)."""
        return changed(pools.drain(name, undo=body.undo, actor=who))

    @api.delete("/pools/{name}", responses=errors(404, 409))
    def remove_pool(name: Name, who: Actor) -> dict[str, Any]:
        """Remove an empty pool (drain it first); the default pool stays."""
        return changed(pools.remove(name, actor=who))

    return api
