"""The platform's ASGI app: the REST API (`/api/v1`, OpenAPI document at /api/v1/openapi.json, Swagger UI at
/api/v1/docs) and, with a gateway, the OpenAI-compatible inference routes and `/metrics` on the same port.

Every call needs an API key (`Authorization: Bearer KEY`); errors are OpenAI-style bodies
(`{"error": {"message", "type", "param", "code"}}`), every response carries `x-request-id`, and no
response ever contains a stack trace, nor a server path unless the client is on the platform's machine.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio.from_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from ballast.control import ControlError, ControlPlane, Reconciler
from ballast.control.datasets import Datasets
from ballast.control.keys import KeyStore
from ballast.control.metrics_history import MetricsHistory
from ballast.control.metrics_sampler import interval_from_env
from ballast.control.pools import PoolStore
from ballast.dashboard import routes as dashboard_routes
from ballast.gateway.service import Gateway
from ballast.observe import RequestIdMiddleware, is_loopback, request_id_var
from ballast.observe.requests import with_tracing
from ballast.observe.tracing import get_tracer
from ballast.openai import APIError, error_body
from ballast.platform import chains_api, datasets_api, deployments, evals_api, keys_api, metrics_api, openapi, pools_api
from ballast.platform.async_routes import async_router
from ballast.platform.canary_guard import resume_guards
from ballast.platform.evals import EvalContext
from ballast.platform.finetune_runner import FineTuneRunner
from ballast.platform.uploads import upload_router

log = logging.getLogger("ballast.platform")


def _err(status: int, message: str, code: str | None = None, param: str | None = None,
         headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status=status, code=code, param=param), status_code=status,
                        headers=headers)


def _allowed(app: FastAPI, path: str) -> str:
    """Every documented method of the path (Starlette's `Allow` names only the first route that matched)."""
    table = getattr(app.state, "allow_table", None)
    if table is None:
        table = app.state.allow_table = [
            (re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(p)) + "$"), {m.upper() for m in ops})
            for p, ops in app.openapi()["paths"].items()]
    methods = set().union(*(m for rx, m in table if rx.match(path)))
    return ", ".join(sorted(methods))


def _public(request: Request, message: str) -> str:
    """Error text for this client: a client on another machine never sees the platform's paths."""
    client = request.client.host if request.client else None
    if is_loopback(client):
        return message
    home = str(request.app.state.control.home)
    return message.replace(home, "$BALLAST_HOME")


def create_app(control: ControlPlane, reconciler: Reconciler | None = None, *, gateway: Gateway | None = None,
               registry: CollectorRegistry | None = None) -> ASGIApp:
    """The REST API, plus (with `gateway`) the inference endpoints and `/metrics`."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if reconciler is not None:
            await reconciler.start()
        if gateway is not None:
            await gateway.start()
        if evals is not None and (reconciler is None or reconciler.lease is None):
            try:  # canaries whose guard a restart interrupted (with --ha an operator decides: see canary_guard)
                await resume_guards(evals)
            except Exception:
                log.exception("could not resume the canary guards; their canaries wait for an operator")
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
    app.router.route_class = openapi.CheckedJSONRoute
    app.state.control = control

    @app.exception_handler(APIError)
    async def _api_error(r: Request, e: APIError) -> JSONResponse:
        return _err(e.status, _public(r, e.message), e.code, e.param, e.headers)

    @app.exception_handler(ControlError)
    async def _control_error(r: Request, e: ControlError) -> JSONResponse:
        return _err(e.status, _public(r, e.message), e.code, e.param)

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
            return _err(405, f"method {r.method} is not allowed on {r.url.path}", "method_not_allowed",
                        headers={"Allow": _allowed(app, r.url.path)})
        return _err(e.status_code, str(e.detail), headers=dict(e.headers or {}))

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

    async def refreshed() -> None:
        if gateway is not None:
            await gateway.refresh_now()

    @app.get("/health", tags=["platform"])
    @app.get("/api/v1/health", tags=["platform"])
    def health() -> dict[str, Any]:
        """Whether the platform is up (no key needed; `/health` answers as vLLM's does, for load balancers)."""
        return {"status": "ok", "reconciler_ticks": reconciler.ticks if reconciler else None}

    app.include_router(deployments.router(control, changed))
    app.include_router(upload_router(changed))
    app.include_router(keys_api.router(KeyStore(control.sessions), refreshed))
    app.include_router(async_router())
    app.include_router(pools_api.router(PoolStore(control.sessions), changed))
    app.include_router(chains_api.router(control, changed))
    app.include_router(datasets_api.router(Datasets(control.sessions, control.home)))
    history = MetricsHistory(control.sessions, interval_from_env() or 10)
    app.include_router(metrics_api.router(history))
    app.router.routes.extend(dashboard_routes(control, history, changed, refreshed))  # the web dashboard at /
    evals = EvalContext(control, gateway) if gateway is not None else None
    if evals is not None:
        app.include_router(evals_api.router(evals))  # evals and the adapter gate (they call the gateway)
    openapi.install(app, public={"/health", "/api/v1/health"})
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
    gateway_app = RequestIdMiddleware(Router(inference, default=_not_found))
    front = Front(app, with_tracing(gateway_app, get_tracer("ballast-gateway")))
    if evals is not None:
        evals.app = front
        app.state.evals = evals
        for companion in gateway.companions:  # fine-tuning jobs hand it to adapter_gate.ship_adapter
            if isinstance(companion, FineTuneRunner):
                companion.gate_ctx = evals
    return front


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
                                      "method_not_allowed", headers={"Allow": ", ".join(sorted(self.allowed))})
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

    PREFIXES = ("/v1/", "/deployments/", "/metrics", "/async_requests/", "/chains/")

    def __init__(self, api: FastAPI, gateway_app: ASGIApp):
        self.api = api
        self.gateway_app = gateway_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.PREFIXES):
            await self.gateway_app(scope, receive, send)
        else:
            await self.api(scope, receive, send)
