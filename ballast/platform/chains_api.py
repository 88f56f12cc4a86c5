"""REST routes for chains as a unit (`/api/v1/chains`): record a version, promote, roll back, read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from ballast.control import ControlPlane
from ballast.control.chains import ChainStore
from ballast.platform.auth import Actor
from ballast.platform.openapi import CheckedJSONRoute, errors
from ballast.platform.schemas import INT32, NAME

Name = Annotated[str, PathParam(pattern=NAME, max_length=63)]


class ChainStep(BaseModel):
    step: str = Field(max_length=128, description="The step's class name.")
    deployment: str = Field(pattern=NAME, max_length=63)
    version: int = Field(ge=1, le=INT32)


class ChainVersionRequest(BaseModel):
    entry: str = Field(pattern=NAME, max_length=63, description="The entry step's deployment.")
    steps: list[ChainStep] = Field(min_length=1, max_length=256, description="Dependencies first.")


class ChainPromoteRequest(BaseModel):
    version: int | None = Field(None, ge=1, le=INT32, description="Default: the newest chain version.")
    env: str = Field("production", pattern=NAME, max_length=63)


class ChainRotateKeyRequest(BaseModel):
    grace_s: float = Field(300.0, ge=0, le=86400, description="How long the current internal key stays valid.")


class ChainRollbackRequest(BaseModel):
    env: str = Field("production", pattern=NAME, max_length=63)


def router(control: ControlPlane, changed: Callable[[Any], Any]) -> APIRouter:
    api = APIRouter(prefix="/api/v1", route_class=CheckedJSONRoute)
    chains = ChainStore(control)

    @api.get("/chains", tags=["chains"])
    def list_chains(_who: Actor) -> dict[str, Any]:
        """Every chain with its versions (each step's deployment and version) and environments."""
        return {"data": chains.list()}

    @api.get("/chains/{name}", tags=["chains"], responses=errors(404))
    def describe(name: Name, _who: Actor) -> dict[str, Any]:
        return chains.describe(name)

    @api.post("/chains/{name}/versions", tags=["chains"], responses=errors(400, 404, 409))
    def record(name: Name, body: ChainVersionRequest, who: Actor) -> dict[str, Any]:
        """Record a chain version from deployed step versions (the same steps again: the same version, `reused`);
        the platform issues the chain's internal key for calls between its steps."""
        return chains.record(name, body.entry, [s.model_dump() for s in body.steps], actor=who)

    @api.post("/chains/{name}/promote", tags=["chains"], responses=errors(404, 409))
    def promote(name: Name, body: ChainPromoteRequest, who: Actor) -> dict[str, Any]:
        """Move an environment of the chain and of every step to a chain version (each step waits for ready
        replicas like any promotion)."""
        return changed(chains.promote(name, body.version, body.env, actor=who))

    @api.post("/chains/{name}/rollback", tags=["chains"], responses=errors(404, 409))
    def rollback(name: Name, body: ChainRollbackRequest, who: Actor) -> dict[str, Any]:
        """Point an environment of the chain and of every step back at the chain version it served before."""
        return changed(chains.rollback(name, body.env, actor=who))

    @api.post("/chains/{name}/rotate-key", tags=["chains"], responses=errors(404))
    def rotate_key(name: Name, body: ChainRotateKeyRequest, who: Actor) -> dict[str, Any]:
        """Issue the chain's next internal key (for calls between its steps); the current one stays valid for
        `grace_s` while running step replicas fetch the new one, then is revoked. No secret is returned."""
        return changed(chains.rotate_key(name, body.grace_s, actor=who))

    return api
