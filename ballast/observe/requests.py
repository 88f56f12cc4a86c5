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
    """Request id on every response and log line; request start/first byte/end to the observer, if any.

    With a `tracer` (tracing on), each POST (inference; not probes or scrapes) gets a SERVER span, current for
    the whole response (a stream included), carrying the request id; its trace id goes on log lines."""

    def __init__(self, app: ASGIApp, observer: RequestObserver | None = None, tracer: Any = None):
        self.app = app
        self.observer = observer
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.tracer is not None and scope["method"] == "POST":
            await self._traced(scope, receive, send)
            return
        await self._handle(scope, receive, send)

    async def _traced(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid = incoming_request_id(scope)
        span = tracing.start_server_span(self.tracer, f"POST {scope['path']}", scope["headers"], rid)
        tokens = (tracing.span_var.set(span), tracing.tracer_var.set(self.tracer),
                  tracing.trace_id_var.set(tracing.trace_id_of(span)))
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_status, rid)
        finally:
            tracing.set_error(span, status[0])
            span.end()
            tracing.span_var.reset(tokens[0])
            tracing.tracer_var.reset(tokens[1])
            tracing.trace_id_var.reset(tokens[2])

    async def _handle(self, scope: Scope, receive: Receive, send: Send, rid: str | None = None) -> None:
        rid = rid or incoming_request_id(scope)
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
