"""The replica server: one package over HTTP, with health, metrics, limits and request ids.

The hot path (`/predict`) is plain Starlette: no per-request validation framework, one pure ASGI
middleware for request ids and metrics, and JSON encoded once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ballast.config import RuntimeConfig
from ballast.observe import RequestIdMiddleware, request_id_var
from ballast.observe.replica_auth import ReplicaAuth
from ballast.observe.requests import with_tracing
from ballast.observe.tracing import get_tracer
from ballast.openai import DONE, APIError, error_body, sse_event
from ballast.openai.jsonio import parse_json
from ballast.openai.priority import PRIORITY_HEADER, parse_priority_header
from ballast.runtime.admission import Admission
from ballast.runtime.host import STREAM_TOKENS_HEADER, Handler, Host, request_priority, stream_tokens
from ballast.runtime.metrics import RequestMetrics, RuntimeMetrics
from ballast.runtime.model import OPENAI_METHODS, LoadState
from ballast.runtime.openapi import replica_openapi

log = logging.getLogger("ballast.runtime")

NDJSON = "application/x-ndjson"


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, set | tuple):
        return list(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


_ENCODER = json.JSONEncoder(default=_json_default, ensure_ascii=False, separators=(",", ":"))


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; one encoder for the process (json.dumps with options builds one per call)."""
    return _ENCODER.encode(obj).encode()


def error_response(err: APIError) -> Response:
    return Response(dumps(err.body()), status_code=err.status, media_type="application/json", headers=err.headers)


async def read_json(request: Request, max_bytes: int) -> Any:
    """Read a JSON body, refusing oversize bodies (413), bad JSON, deep nesting and lone surrogates (400)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise APIError(413, f"request body is {length} bytes; the limit is {max_bytes}", code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body exceeds the limit of {max_bytes} bytes", code="request_too_large")
        chunks.append(chunk)
    body = request._body = b"".join(chunks)  # what `request.body()` returns from now on (a proxy forwards it)
    return parse_json(body)


class ReplicaApp:
    """Builds the ASGI app around a `Host` and the runtime limits."""

    def __init__(self, host: Host, runtime: RuntimeConfig, *, load_on_startup: bool = True,
                 token: str | None = None):
        self.host = host
        self.token = token  # a Ray replica's: every request but the probes must carry it (observe.replica_auth)
        self.runtime = runtime
        self.metrics = RuntimeMetrics()
        self.admission = Admission(runtime.predict_concurrency, runtime.max_queue, self.metrics)
        self.draining = False
        self._load_task: asyncio.Task[None] | None = None
        self._load_on_startup = load_on_startup
        self._openapi: bytes | None = None
        self.app = self._build()

    # ---- app -------------------------------------------------------------------------------
    def _build(self) -> ASGIApp:
        app = Starlette(lifespan=self._lifespan)
        app.add_route("/predict", self._predict, methods=["POST"])
        app.add_route("/health", self._live, methods=["GET"])
        app.add_route("/health/live", self._live, methods=["GET"])
        app.add_route("/health/ready", self._ready, methods=["GET"])
        app.add_route("/metrics", self._metrics, methods=["GET"])
        app.add_route("/openapi.json", self._openapi_json, methods=["GET"])
        for method, path in OPENAI_METHODS.items():
            app.add_route(path, self._openai_route(method), methods=["POST"])
        extra_paths: set[str] = set()
        for path, handler, methods in self.host.extra_routes():
            app.add_route(path, self._checked_body(handler), methods=methods)
            extra_paths.add(path)
        self.host.bind_metrics(self.metrics.registry)
        app.add_exception_handler(APIError, self._api_error)
        app.add_exception_handler(json.JSONDecodeError, self._bad_json)
        app.add_exception_handler(404, self._not_found)
        app.add_exception_handler(405, self._not_allowed)
        app.add_exception_handler(Exception, self._internal_error)
        routes = {"/predict", "/health", "/health/live", "/health/ready", "/metrics", "/openapi.json",
                  *OPENAI_METHODS.values(), *extra_paths}
        inner: ASGIApp = ReplicaAuth(app, self.token) if self.token else app
        return with_tracing(RequestIdMiddleware(inner, RequestMetrics(self.metrics, routes)), self._tracer())

    def _tracer(self) -> Any:
        """The replica's tracer when OTEL_EXPORTER_OTLP_ENDPOINT is set (the platform passes it on), else None."""
        attrs = {"ballast.package": self.host.package.name}
        if replica_id := os.environ.get("BALLAST_REPLICA_ID"):
            attrs["service.instance.id"] = replica_id
        return get_tracer("ballast-replica", attrs)

    def _checked_body(self, handler: Handler) -> Handler:
        """A host's own routes read their JSON body through `read_json` too (size limit, malformed JSON), and
        the body must be an object: `request.json()` then returns the checked value."""

        async def checked(request: Request) -> Response:
            if request.method in ("POST", "PUT", "PATCH"):
                body = await read_json(request, self.runtime.max_request_bytes)
                if not isinstance(body, dict):
                    raise APIError(400, "the request body must be a JSON object", code="invalid_request")
                request._json = body
            return await handler(request)

        return checked

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        if self._load_on_startup:
            self._load_task = asyncio.create_task(self._load())
        yield
        if self._load_task and not self._load_task.done():
            self._load_task.cancel()
        await self.host.shutdown()

    async def _load(self) -> None:
        timeout = self.host.package.config.health.startup_timeout_s
        try:
            await asyncio.wait_for(self.host.load(), timeout)
        except TimeoutError:
            self.host.state = LoadState.FAILED
            self.host.error = f"load() did not finish within startup_timeout_s={timeout:g}"
            log.error(self.host.error)
        if self.host.state is LoadState.READY:
            self.metrics.ready.set(1)
            self.metrics.load_seconds.set(self.host.load_seconds or 0)

    # ---- error handlers --------------------------------------------------------------------
    async def _api_error(self, _req: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def _bad_json(self, _req: Request, exc: Exception) -> Response:
        return error_response(APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json"))

    async def _not_found(self, req: Request, _exc: Exception) -> Response:
        return error_response(APIError(404, f"no route {req.method} {req.url.path}", code="not_found"))

    async def _not_allowed(self, req: Request, exc: Exception) -> Response:
        allow = getattr(exc, "headers", None) or {}  # Starlette names the route's methods in `Allow`
        return error_response(APIError(405, f"method {req.method} is not allowed on {req.url.path}",
                                       code="method_not_allowed", headers=dict(allow)))

    async def _internal_error(self, _req: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        rid = request_id_var.get()
        body = error_body(f"internal error (request id {rid}); see the replica log", status=500, code="internal_error")
        return JSONResponse(body, status_code=500)

    # ---- health and metrics ----------------------------------------------------------------
    async def _live(self, _req: Request) -> Response:
        if self.host.state is LoadState.FAILED:
            return JSONResponse({"status": "failed", "reason": f"load failed: {self.host.error}"}, status_code=503)
        return JSONResponse({"status": "alive"})

    async def _ready(self, _req: Request) -> Response:
        if self.draining:
            return JSONResponse({"status": "not_ready", "reason": "shutting down"}, status_code=503)
        ok, reason = await self.host.healthy()
        self.metrics.ready.set(1 if ok else 0)
        if not ok:
            return JSONResponse({"status": "not_ready", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready", "load_seconds": self.host.load_seconds})

    async def _openapi_json(self, _req: Request) -> Response:
        """Cached once the host has loaded (a Python model's methods are known only then)."""
        if self._openapi is not None:
            return Response(self._openapi, media_type="application/json")
        loaded = self.host.state is LoadState.READY
        names = ["predict", *OPENAI_METHODS]
        served = {n for n in names if self.host.has(n)} if loaded else set(names)
        engine = self.host.package.config.engine
        body = dumps(replica_openapi(self.host, engine_kind=engine.kind if engine else None, served=served))
        if loaded:
            self._openapi = body
        return Response(body, media_type="application/json")

    async def _metrics(self, _req: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- inference -------------------------------------------------------------------------
    def _check_ready(self) -> None:
        if self.draining:
            raise APIError(503, "the replica is shutting down; retry on another replica", code="shutting_down",
                           headers={"Retry-After": "1"})
        if self.host.state is LoadState.LOADING:
            raise APIError(503, "the model is still loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "2"})
        if self.host.state is LoadState.FAILED:
            raise APIError(503, f"the model failed to load: {self.host.error}", code="model_load_failed")

    async def _predict(self, request: Request) -> Response:
        self._check_ready()
        if not self.host.has("predict"):
            raise APIError(404, "this model defines no predict(); use its /v1 routes", code="not_found")
        inputs = await read_json(request, self.runtime.max_request_bytes)
        ndjson = NDJSON in request.headers.get("accept", "")
        return await self._run(lambda: self.host.predict(inputs), request, ndjson=ndjson, openai_stream=False,
                               cancellable=self.host.cancellable("predict"))

    def _openai_route(self, method: str) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            if not self.host.has(method):
                raise APIError(404, f"this model does not serve {OPENAI_METHODS[method]}", code="not_found")
            self._check_ready()
            body = await read_json(request, self.runtime.max_request_bytes)
            if not isinstance(body, dict):
                raise APIError(400, "the request body must be a JSON object", code="invalid_request")
            request_priority.set(parse_priority_header(request.headers.get(PRIORITY_HEADER)))
            stream_tokens.set(request.headers.get(STREAM_TOKENS_HEADER) == "1")
            return await self._run(lambda: self.host.call(method, body), request, ndjson=False, openai_stream=True,
                                   cancellable=self.host.cancellable(method))

        return handler

    async def _run(
        self, work: Callable[[], Awaitable[Any]], request: Request, *, ndjson: bool, openai_stream: bool,
        cancellable: bool = True,
    ) -> Response:
        """Admit, run with the request timeout, and shape the result (JSON or a stream).

        When the work can be cancelled (async code, an engine), a client that disconnects cancels it:
        an engine aborts the request and frees its KV blocks at once.
        """
        # Queued work the platform sends (x-ballast-priority 1..4) waits behind interactive requests (none: 0).
        await self.admission.acquire(parse_priority_header(request.headers.get(PRIORITY_HEADER)) or 0)
        released = False
        try:
            try:
                async with asyncio.timeout(self.runtime.request_timeout_s):
                    if cancellable:
                        result = await _unless_disconnected(work(), request)
                        if result is _DISCONNECTED:
                            return Response(status_code=499)
                    else:
                        result = await work()
            except TimeoutError:
                raise APIError(
                    504, f"the request took longer than request_timeout_s={self.runtime.request_timeout_s:g}",
                    code="timeout",
                ) from None
            except APIError:
                raise
            except Exception as e:
                raise _user_error(e) from None
            if isinstance(result, AsyncIterator):
                released = True  # the stream owns the slot from here and releases it when it ends
                deadline = time.monotonic() + self.runtime.request_timeout_s
                return self._stream(result, deadline, ndjson=ndjson, openai=openai_stream)
            if isinstance(result, Response):
                return result
            return Response(dumps(result), media_type="application/json")
        finally:
            if not released:
                self.admission.release()

    def _stream(self, items: AsyncIterator[Any], deadline: float, *, ndjson: bool, openai: bool) -> Response:
        async def body() -> AsyncIterator[bytes]:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    item = await asyncio.wait_for(anext(items), max(0.0, remaining))
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    err = APIError(504, "the stream exceeded request_timeout_s", code="timeout")
                    yield _frame(err.body(), ndjson, event="error")
                    return
                except Exception as e:
                    yield _frame(_user_error(e).body(), ndjson, event="error")
                    return
                yield item if isinstance(item, bytes) else _frame(item, ndjson)
            if openai and not ndjson:
                yield DONE

        async def close() -> None:
            aclose = getattr(items, "aclose", None)
            try:
                if aclose is not None:
                    await aclose()
            except Exception:
                log.exception("closing the model's stream failed")
            finally:
                self.admission.release()

        media = NDJSON if ndjson else "text/event-stream"
        return _ClosingStream(body(), close, media_type=media, headers={"Cache-Control": "no-cache"})


class _ClosingStream(StreamingResponse):
    """A stream whose cleanup runs however the response ends: finished, failed, or the client left
    before the first byte (when the body generator may never have started)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]], **kw: Any):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self._on_close())


_DISCONNECTED = object()


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so only disconnects remain)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(work: Awaitable[Any], request: Request) -> Any:
    """Run `work`, cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return _DISCONNECTED
    return task.result()


def _frame(item: Any, ndjson: bool, event: str | None = None) -> bytes:
    if ndjson:
        return dumps({"error": item["error"]} if event == "error" else item) + b"\n"
    return sse_event(item if isinstance(item, str) else dumps(item).decode(), event=event)


def _user_error(e: Exception) -> APIError:
    """User code raised: log the trace (with the request id), return a 500 that names the request."""
    if isinstance(e, APIError):
        return e
    log.error("model raised %s", type(e).__name__, exc_info=e)
    rid = request_id_var.get()
    return APIError(
        500, f"the model raised {type(e).__name__} (request id {rid}); see the replica log", code="model_error"
    )
