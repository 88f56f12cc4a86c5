"""The platform's REST API (`/api/v1`, described by FastAPI's OpenAPI document at /api/v1/openapi.json).

Every call needs an API key (`Authorization: Bearer KEY`); errors are OpenAI-style bodies
(`{"error": {"message", "type", "param", "code"}}`), every response carries `x-request-id`, and no
response ever contains a stack trace.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import anyio.from_thread
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ballast.control import ControlError, ControlPlane, Reconciler
from ballast.control.keys import KeyStore
from ballast.control.logs import follow, tail_lines
from ballast.gateway.auth import MISSING_KEY_MESSAGE, api_key_from_headers
from ballast.gateway.service import Gateway
from ballast.observe import REQUEST_ID_HEADER, new_request_id, request_id_var
from ballast.openai import APIError, error_body
from ballast.platform.async_routes import async_router
from ballast.platform.auth import lookup

log = logging.getLogger("ballast.platform")
MAX_UPLOAD_BYTES = int(os.environ.get("BALLAST_MAX_UPLOAD_BYTES") or 4 * 2**30)


class DeployRequest(BaseModel):
    path: str = Field(description="Package directory on the platform's machine.")
    name: str | None = Field(None, description="Deployment name; the package's name by default.")
    env: str | None = Field(None, description="Promote the new version to this environment.")


class PromoteRequest(BaseModel):
    version: int
    env: str = "production"
    canary: int | None = Field(None, description="Percent of traffic for the new version first (1-99).")
    ramp_s: float = Field(0.0, description="Shift the rest stepwise over this many seconds (0: stay at canary).")


class RollbackRequest(BaseModel):
    env: str = "production"
    version: int | None = None


class ScaleRequest(BaseModel):
    env: str = "production"
    min: int | None = None
    max: int | None = None


class KeyRequest(BaseModel):
    name: str = Field("", max_length=128, description="A label for people (who or what uses the key).")
    scopes: list[str] = Field(["inference"], description="inference, metrics and/or admin.")
    deployments: list[str] | None = Field(None, description="Deployments the key may use (default: all).")
    rpm: int | None = Field(None, description="Requests per minute (token bucket).")
    tpm: int | None = Field(None, description="Prompt + completion tokens per minute (token bucket).")
    token_budget: int | None = Field(None, description="Tokens per period; over it, 429 until the next period.")
    per: str = Field("month", description="Budget period: day or month (UTC).")


class DevRequest(BaseModel):
    path: str
    name: str | None = None


class RequestIdMiddleware:
    """Sets the request id (the client's `x-request-id`, or a new one) and echoes it on every response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for k, v in scope.get("headers", []):
            if k == b"x-request-id":
                rid = v.decode("latin-1")[:128]
        rid = rid or new_request_id()
        token = request_id_var.set(rid)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), rid.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            request_id_var.reset(token)


def _err(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status=status, code=code, param=param), status_code=status)


def actor(request: Request) -> str:
    """The caller, from its API key (`Authorization: Bearer KEY`, `api-key` or `x-api-key`); admin only for now."""
    secret = api_key_from_headers(request.headers)
    if not secret:
        raise APIError(401, MISSING_KEY_MESSAGE, code="missing_api_key")
    control: ControlPlane = request.app.state.control
    key = lookup(control.sessions, secret)
    if key is None:
        raise APIError(401, "invalid API key", code="invalid_api_key")
    if "admin" not in (key.scopes or []):
        raise APIError(403, "this key may not manage deployments (needs the admin scope)", code="insufficient_scope")
    return f"{key.name or 'key'}:{key.prefix}"


Actor = Annotated[str, Depends(actor)]


def create_app(control: ControlPlane, reconciler: Reconciler | None = None, *, gateway: Gateway | None = None,
               registry: CollectorRegistry | None = None) -> ASGIApp:
    """The REST API, plus (with `gateway`) the inference endpoints and `/metrics`."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if reconciler is not None:
            await reconciler.start()
        if gateway is not None:
            await gateway.start()
        # Everything built at startup (modules, app, ORM, routes) lives as long as the process: move it out of
        # the collector's reach, or every full collection re-scans it (measured: ~58 ms pauses under load, the
        # gateway's p99 at 64 connections; freezing took p99 from 74 to 32 ms and added 16% requests/s).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            # In-flight requests have finished (uvicorn drains them first): flush usage, then stop replicas.
            if gateway is not None:
                await gateway.stop()
            if reconciler is not None:
                await reconciler.shutdown()

    app = FastAPI(title="Ballast platform", version="1", lifespan=lifespan, openapi_url="/api/v1/openapi.json",
                  docs_url="/api/v1/docs", redoc_url=None)
    app.state.control = control

    @app.exception_handler(APIError)
    async def _api_error(_r: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ControlError)
    async def _control_error(_r: Request, e: ControlError) -> JSONResponse:
        return _err(e.status, e.message, e.code, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", []) if x not in ("body", "query", "path")]
        param = ".".join(loc) or None
        msg = f"{param}: {first.get('msg')}" if param else str(first.get("msg", "invalid request"))
        return _err(400, msg, "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(r: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            return _err(404, f"no route {r.method} {r.url.path}", "not_found")
        if e.status_code == 405:
            return _err(405, f"method {r.method} is not allowed on {r.url.path}", "method_not_allowed")
        return _err(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(_r: Request, e: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=e)
        return _err(500, f"internal error (request id {request_id_var.get()}); see the platform log",
                    "internal_error")


    def changed(result: Any) -> Any:
        """Desired state changed (called from a worker thread): reconcile now, and route by it at once."""
        if reconciler is not None:
            reconciler.wake()
        if gateway is not None:
            anyio.from_thread.run(gateway.refresh_now)
        return result

    api = "/api/v1"

    @app.get(api + "/health", tags=["platform"])
    def health() -> dict[str, Any]:
        """Whether the platform is up (no key needed)."""
        return {"status": "ok", "reconciler_ticks": reconciler.ticks if reconciler else None}

    @app.get(api + "/deployments", tags=["deployments"])
    def list_deployments(_who: Actor) -> dict[str, Any]:
        return {"data": control.list_deployments()}

    @app.post(api + "/deployments", tags=["deployments"], status_code=201)
    def deploy(body: DeployRequest, who: Actor) -> dict[str, Any]:
        """Deploy a package directory that is on the platform's machine."""
        return changed(control.deploy(body.path, body.name, env=body.env, actor=who))

    @app.post(api + "/deployments/{name}/versions", tags=["deployments"], status_code=201)
    async def upload(name: str, request: Request, who: Actor,
                     env: Annotated[str | None, Query()] = None) -> dict[str, Any]:
        """Deploy a package uploaded as a gzipped tar archive (the request body)."""
        declared = int(request.headers.get("content-length") or 0)
        if declared > MAX_UPLOAD_BYTES:
            raise APIError(413, f"package archive is larger than {MAX_UPLOAD_BYTES} bytes", code="too_large")
        tmp = Path(tempfile.mkdtemp(prefix="upload-", dir=control.home))
        try:
            archive = tmp / "package.tar.gz"
            size = 0
            with open(archive, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_UPLOAD_BYTES:
                        raise APIError(413, f"package archive is larger than {MAX_UPLOAD_BYTES} bytes",
                                       code="too_large")
                    f.write(chunk)

            def unpack_and_deploy() -> dict[str, Any]:
                root = tmp / "package"
                root.mkdir()
                try:
                    with tarfile.open(archive, "r:*") as tar:
                        tar.extractall(root, filter="data")
                except (tarfile.TarError, OSError) as e:
                    raise APIError(400, f"not a readable tar archive: {e}", code="invalid_archive") from None
                entries = list(root.iterdir())
                pkg = entries[0] if len(entries) == 1 and entries[0].is_dir() else root
                return control.deploy(pkg, name, env=env, actor=who)

            return await run_in_threadpool(changed, await run_in_threadpool(unpack_and_deploy))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @app.get(api + "/deployments/{name}", tags=["deployments"])
    def show(name: str, _who: Actor) -> dict[str, Any]:
        """Versions, environments, and replicas with state, pool, url, uptime, restarts and last error."""
        return control.describe(name)

    @app.delete(api + "/deployments/{name}", tags=["deployments"])
    def delete(name: str, who: Actor) -> dict[str, Any]:
        return changed(control.delete(name, actor=who))

    @app.post(api + "/deployments/{name}/promote", tags=["environments"])
    def promote(name: str, body: PromoteRequest, who: Actor) -> dict[str, Any]:
        """Point an environment at a version once it has ready replicas (`state`: promoted, canary or pending)."""
        return changed(control.promote(name, body.version, body.env, canary=body.canary, ramp_s=body.ramp_s,
                                       actor=who))

    @app.post(api + "/deployments/{name}/rollback", tags=["environments"])
    def rollback(name: str, body: RollbackRequest, who: Actor) -> dict[str, Any]:
        return changed(control.rollback(name, body.env, version=body.version, actor=who))

    @app.post(api + "/deployments/{name}/scale", tags=["environments"])
    def scale(name: str, body: ScaleRequest, who: Actor) -> dict[str, Any]:
        return changed(control.scale(name, body.env, min_replicas=body.min, max_replicas=body.max, actor=who))

    @app.get(api + "/deployments/{name}/environments/{env}/endpoints", tags=["environments"])
    def endpoints(name: str, env: str, _who: Actor) -> dict[str, Any]:
        """Where the environment's traffic goes now: versions, weights and ready replica URLs."""
        return control.endpoints(name, env)

    @app.get(api + "/routes", tags=["environments"])
    def routes(_who: Actor) -> dict[str, Any]:
        """Every deployment's environments and ready replicas (what the gateway routes by)."""
        return {"data": control.routing_table()}

    @app.get(api + "/deployments/{name}/events", tags=["events"])
    def deployment_events(name: str, _who: Actor, limit: Annotated[int, Query(ge=1, le=10000)] = 100,
                          after: int | None = None) -> dict[str, Any]:
        return {"data": control.events(name, limit, after)}

    @app.get(api + "/events", tags=["events"])
    def events(_who: Actor, deployment: str | None = None, limit: Annotated[int, Query(ge=1, le=10000)] = 100,
               after: int | None = None) -> dict[str, Any]:
        """The audit log: who deployed, promoted, rolled back, scaled or deleted what, and when."""
        return {"data": control.events(deployment, limit, after)}

    @app.get(api + "/deployments/{name}/logs", tags=["deployments"])
    def logs(name: str, _who: Actor, version: int | None = None, tail: Annotated[int, Query(ge=0, le=100000)] = 100,
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

    keys = KeyStore(control.sessions)

    async def keys_changed(result: dict[str, Any]) -> dict[str, Any]:
        if gateway is not None:  # effective in this process before the call returns
            await gateway.refresh_now()
        return result

    @app.post(api + "/keys", tags=["keys"], status_code=201)
    async def create_key(body: KeyRequest, _who: Actor) -> dict[str, Any]:
        """A new API key. The response's `key` is the secret, shown this once; only its hash is stored."""
        return await keys_changed(await run_in_threadpool(
            lambda: keys.create(name=body.name, scopes=body.scopes, deployments=body.deployments, rpm=body.rpm,
                                tpm=body.tpm, token_budget=body.token_budget, budget_per=body.per)))

    @app.get(api + "/keys", tags=["keys"])
    def list_keys(_who: Actor, include_revoked: bool = False) -> dict[str, Any]:
        return {"data": keys.list(include_revoked)}

    @app.delete(api + "/keys/{key_id}", tags=["keys"])
    async def revoke_key(key_id: str, _who: Actor) -> dict[str, Any]:
        """Revoke by id or shown prefix; the gateway refuses the key within a second (at once in this process)."""
        return await keys_changed(await run_in_threadpool(keys.revoke, key_id))

    @app.get(api + "/usage", tags=["keys"])
    def usage(_who: Actor, key: str | None = None, deployment: str | None = None, since: datetime | None = None,
              group: str = "hour") -> dict[str, Any]:
        """Requests, prompt/completion/cached tokens and errors per key, deployment, version and hour
        (`group=key` or `group=deployment` sums them). Usage the gateway has not flushed yet (at most a
        second's worth) is not included."""
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        return {"data": keys.usage(key=key, deployment=deployment, since=since, group=group)}

    @app.post(api + "/dev", tags=["dev"], status_code=201)
    def dev(body: DevRequest, who: Actor) -> dict[str, Any]:
        """A development replica that runs from the source directory and reloads when its files change."""
        return changed(control.dev(body.path, body.name, actor=who))

    @app.delete(api + "/dev/{name}", tags=["dev"])
    def dev_stop(name: str, who: Actor) -> dict[str, Any]:
        return changed(control.dev_stop(name, actor=who))

    app.include_router(async_router())
    app.add_middleware(RequestIdMiddleware)
    if gateway is None:
        return app
    metrics_registry = registry

    async def metrics(request: Request) -> Response:
        gateway.authenticate(request, "metrics")
        body = generate_latest(metrics_registry) if metrics_registry is not None else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    inference = [Route(path, _Guard(handler, methods)) for path, handler, methods in gateway.routes_for_app()]
    inference.append(Route("/metrics", _Guard(metrics, ["GET"])))
    return Front(app, RequestIdMiddleware(Router(inference, default=_not_found)))


Handler = Callable[[Request], Awaitable[Response]]


class _Guard:
    """One inference route as a bare ASGI app (no FastAPI layers per request), with OpenAI-style errors."""

    def __init__(self, handler: Handler, methods: list[str]):
        self.handler = handler
        self.allowed = set(methods)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        if request.method not in self.allowed:
            response: Response = _err(405, f"method {request.method} is not allowed on {request.url.path}",
                                      "method_not_allowed")
        else:
            try:
                response = await self.handler(request)
            except APIError as e:
                response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
            except Exception as e:
                log.error("unhandled error in the gateway", exc_info=e)
                response = _err(500, f"internal error (request id {request_id_var.get()}); see the platform log",
                                "internal_error")
        await response(scope, receive, send)


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    await _err(404, f"no route {scope.get('method')} {scope.get('path')}", "not_found")(scope, receive, send)


class Front:
    """The platform's ASGI app: inference paths go straight to the gateway's routes, everything else (and the
    lifespan) to the REST API."""

    PREFIXES = ("/v1/", "/deployments/", "/metrics", "/async_requests/")

    def __init__(self, api: FastAPI, gateway_app: ASGIApp):
        self.api = api
        self.gateway_app = gateway_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.PREFIXES):
            await self.gateway_app(scope, receive, send)
        else:
            await self.api(scope, receive, send)
