"""REST routes for deployments, versions, environments, events, logs and dev replicas."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse

from ballast.control import ControlPlane
from ballast.control.logs import follow, tail_lines
from ballast.observe import is_loopback
from ballast.openai import APIError
from ballast.platform.auth import Actor
from ballast.platform.openapi import CheckedJSONRoute, errors
from ballast.platform.schemas import (
    INT32,
    INT53,
    NAME,
    DeployRequest,
    DevRequest,
    PromoteRequest,
    RollbackRequest,
    ScaleRequest,
)
from ballast.platform.uploads import deploy_upload

Name = Annotated[str, PathParam(pattern=NAME, max_length=63)]
After = Annotated[int | None, Query(ge=0, le=INT53)]
Limit = Annotated[int, Query(ge=1, le=10000)]
_ARCHIVE = {"required": True, "content": {media: {"schema": {"type": "string", "format": "binary"}}
                                          for media in ("application/gzip", "application/octet-stream")}}


def server_path(request: Request, path: str) -> Path:
    """A package directory named by the client: only a client on this machine may name one (anyone else
    would read the server's files), and it must hold a package (404 otherwise)."""
    client = request.client.host if request.client else None
    if not is_loopback(client):
        raise APIError(403, "a package path on the platform's machine is accepted only from that machine; "
                            "upload the package instead (`ballast deploy DIR` does: POST a gzipped tar to "
                            "/api/v1/packages with its sha256 in x-ballast-sha256)", code="server_path_forbidden",
                   param="path")
    p = Path(path)
    try:
        found = (p / "ballast.yaml").is_file()
    except OSError:  # a name too long for the filesystem, say
        found = False
    if not found:
        raise APIError(404, f"no package at {path} (no ballast.yaml there)", code="package_not_found", param="path")
    return p


def router(control: ControlPlane, changed: Callable[[Any], Any]) -> APIRouter:
    """The routes, bound to the control plane; `changed` runs after a change of desired state."""
    api = APIRouter(prefix="/api/v1", route_class=CheckedJSONRoute)

    @api.get("/deployments", tags=["deployments"])
    def list_deployments(_who: Actor) -> dict[str, Any]:
        return {"data": control.list_deployments()}

    @api.post("/deployments", tags=["deployments"], status_code=201, responses=errors(404, 409))
    def deploy(body: DeployRequest, who: Actor, request: Request) -> dict[str, Any]:
        """Deploy a package directory on the platform's machine (loopback clients only; others upload)."""
        return changed(control.deploy(server_path(request, body.path), body.name, env=body.env, actor=who,
                                      pools=body.pools))

    @api.post("/deployments/{name}/versions", tags=["deployments"], status_code=201, responses=errors(409, 413),
              openapi_extra={"requestBody": _ARCHIVE})
    async def upload(name: Name, request: Request, who: Actor,
                     env: Annotated[str | None, Query(pattern=NAME)] = None) -> dict[str, Any]:
        """Deploy a package uploaded as a gzipped tar archive (the request body); `POST /api/v1/packages`
        does the same with a sha256 check, and is what the CLI uses."""
        return await deploy_upload(request, changed, name=name, env=env, who=who)

    @api.get("/deployments/{name}", tags=["deployments"], responses=errors(404))
    def show(name: Name, _who: Actor) -> dict[str, Any]:
        """Versions, environments, and replicas with state, pool, url, uptime, restarts and last error."""
        return control.describe(name)

    @api.delete("/deployments/{name}", tags=["deployments"], responses=errors(404, 409))
    def delete(name: Name, who: Actor, force: bool = False) -> dict[str, Any]:
        """Delete a deployment. A step of a chain version is refused (409 naming the chains) unless `force`, which
        marks those chain versions broken (a run of one answers 409 naming the missing step)."""
        return changed(control.delete(name, force=force, actor=who))

    @api.post("/deployments/{name}/promote", tags=["environments"], responses=errors(404, 409))
    def promote(name: Name, body: PromoteRequest, who: Actor) -> dict[str, Any]:
        """Point an environment at a version once it has ready replicas (`state`: promoted, canary or pending)."""
        return changed(control.promote(name, body.version, body.env, canary=body.canary, ramp_s=body.ramp_s,
                                       actor=who))

    @api.post("/deployments/{name}/rollback", tags=["environments"], responses=errors(404, 409))
    def rollback(name: Name, body: RollbackRequest, who: Actor) -> dict[str, Any]:
        return changed(control.rollback(name, body.env, version=body.version, actor=who))

    @api.post("/deployments/{name}/scale", tags=["environments"], responses=errors(404))
    def scale(name: Name, body: ScaleRequest, who: Actor) -> dict[str, Any]:
        """Set the replica range; `min` above `max` (given or stored) is a 400 for an existing deployment."""
        if body.min is not None and body.max is not None and body.min > body.max:
            control.describe(name)  # an unknown deployment is a 404 first, whatever the body
        return changed(control.scale(name, body.env, min_replicas=body.min, max_replicas=body.max, actor=who))

    @api.get("/deployments/{name}/environments/{env}/endpoints", tags=["environments"], responses=errors(404))
    def endpoints(name: Name, env: Name, _who: Actor) -> dict[str, Any]:
        """Where the environment's traffic goes now: versions, weights and ready replica URLs."""
        return control.endpoints(name, env)

    @api.get("/routes", tags=["environments"])
    def routes(_who: Actor) -> dict[str, Any]:
        """Every deployment's environments and ready replicas (what the gateway routes by)."""
        return {"data": control.routing_table()}

    @api.get("/deployments/{name}/events", tags=["events"], responses=errors(404))
    def deployment_events(name: Name, _who: Actor, limit: Limit = 100, after: After = None) -> dict[str, Any]:
        return {"data": control.events(name, limit, after)}

    @api.get("/events", tags=["events"])
    def events(_who: Actor, deployment: Annotated[str | None, Query(max_length=63)] = None, limit: Limit = 100,
               after: After = None) -> dict[str, Any]:
        """The audit log: who deployed, promoted, rolled back, scaled or deleted what, and when."""
        return {"data": control.events(deployment, limit, after)}

    @api.get("/deployments/{name}/logs", tags=["deployments"], responses={
        **errors(404), 200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Log lines."}})
    def logs(name: Name, _who: Actor, version: Annotated[int | None, Query(ge=1, le=INT32)] = None,
             tail: Annotated[int, Query(ge=0, le=100000)] = 100,
             follow_: Annotated[bool, Query(alias="follow")] = False) -> StreamingResponse:
        """Replica stdout/stderr, each line prefixed with `[vN replica]`; `follow=true` streams new lines."""
        control.describe(name)  # 404 for an unknown deployment
        if follow_:
            async def lines() -> AsyncIterator[bytes]:
                async for line in follow(control.logs_dir, name, version, tail):
                    yield line.encode()

            return StreamingResponse(lines(), media_type="text/plain; charset=utf-8")
        text = "".join(line + "\n" for line in tail_lines(control.logs_dir, name, version, tail))
        return StreamingResponse(iter([text.encode()]), media_type="text/plain; charset=utf-8")

    @api.post("/dev", tags=["dev"], status_code=201, responses=errors(404, 409))
    def dev(body: DevRequest, who: Actor, request: Request) -> dict[str, Any]:
        """A development replica that runs from a source directory on the platform's machine (loopback clients
        only) and reloads when its files change."""
        return changed(control.dev(server_path(request, body.path), body.name, actor=who))

    @api.delete("/dev/{name}", tags=["dev"], responses=errors(404))
    def dev_stop(name: Name, who: Actor) -> dict[str, Any]:
        return changed(control.dev_stop(name, actor=who))

    return api
