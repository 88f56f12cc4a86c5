"""The request-id middleware of every Ballast server (replica runtime, platform API and gateway).

One pure ASGI middleware: it takes the client's `x-request-id` (or makes one), sets it for log lines,
echoes it on the response, and optionally reports each request to an observer (the replica's
Prometheus metrics) without a second middleware layer on the hot path.
"""

from __future__ import annotations

from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ballast.observe import tracing
from ballast.observe.logging import REQUEST_ID_HEADER, new_request_id, request_id_var

_HEADER = REQUEST_ID_HEADER.encode()


class RequestObserver(Protocol):
    """Told about each HTTP request: `start` returns a per-request handle with the two callbacks."""

    def start(self, scope: Scope) -> ObservedRequest: ...


class ObservedRequest(Protocol):
    def first_byte(self) -> None: ...

    def done(self, status: int) -> None: ...


def incoming_request_id(scope: Scope) -> str:
    """The client's request id (at most 128 characters), or a new one."""
    for k, v in scope["headers"]:
        if k == _HEADER:
            rid = v.decode("latin-1")[:128]
            if rid:
                return rid
            break
    return new_request_id()


class RequestIdMiddleware:
    """Request id on every response and log line; request start/first byte/end to the observer, if any."""

    def __init__(self, app: ASGIApp, observer: RequestObserver | None = None):
        self.app = app
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = incoming_request_id(scope)
        header = (_HEADER, rid.encode("latin-1"))
        token = request_id_var.set(rid)
        observed = self.observer.start(scope) if self.observer is not None else None
        status = 500
        waiting_first_byte = observed is not None

        async def send_wrapper(message: Message) -> None:
            nonlocal status, waiting_first_byte
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            elif waiting_first_byte and kind == "http.response.body":
                waiting_first_byte = False
                observed.first_byte()  # type: ignore[union-attr]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if observed is not None:
                observed.done(status)
            request_id_var.reset(token)


def with_tracing(app: ASGIApp, tracer: Any) -> ASGIApp:
    """`app` (a RequestIdMiddleware) behind a SERVER span per POST when `tracer` is set; else `app` itself, so
    with tracing off the request path is exactly what it was."""
    return app if tracer is None else TracingMiddleware(app, tracer)


class TracingMiddleware:
    """One SERVER span per POST (inference; not probes or scrapes), current for the whole response (a stream
    included), child of the caller's `traceparent`, carrying the request id; its trace id goes on log lines.

    It sits outside the request-id middleware and hands it the request id it put on the span (adding the
    header when the client sent none), so both name the same id."""

    def __init__(self, app: ASGIApp, tracer: Any):
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        rid = next((v.decode("latin-1")[:128] for k, v in scope["headers"] if k == _HEADER), "")
        if not rid:
            rid = new_request_id()
            headers = [h for h in scope["headers"] if h[0] != _HEADER]  # none, or an empty one
            scope = {**scope, "headers": [*headers, (_HEADER, rid.encode("latin-1"))]}
        span = tracing.start_server_span(self.tracer, f"POST {scope['path']}", scope["headers"], rid)
        tokens = (tracing.span_var.set(span), tracing.tracer_var.set(self.tracer),
                  tracing.trace_id_var.set(tracing.trace_id_of(span)))
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            tracing.set_error(span, status)
            span.end()
            tracing.span_var.reset(tokens[0])
            tracing.tracer_var.reset(tokens[1])
            tracing.trace_id_var.reset(tokens[2])
