"""OpenTelemetry traces across gateway → replica → engine, exported over OTLP/HTTP.

Tracing is on only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (and `OTEL_SDK_DISABLED` is not true). Off, no
OpenTelemetry module is imported and no tracer provider exists: the request path pays one `is None` test.
On, each process has one SDK tracer provider with a batching OTLP/HTTP exporter (the standard `OTEL_*`
variables configure it), kept private rather than installed globally, so a user's own instrumentation in a
model is left alone.

The current server span lives in a context variable of ours (set by the request-id middleware), so code that
adds attributes or child spans needs no OpenTelemetry context plumbing; the W3C `traceparent` header carries
it from the gateway to the replica. Engine phases are recorded as timestamps in the engine thread and turned
into spans here, after the fact, so the engine loop makes no OpenTelemetry call.
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACEPARENT = "traceparent"

span_var: contextvars.ContextVar[Any] = contextvars.ContextVar("ballast_span", default=None)
tracer_var: contextvars.ContextVar[Any] = contextvars.ContextVar("ballast_tracer", default=None)
trace_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("ballast_trace_id", default="")

_lock = threading.Lock()
_tracers: dict[str, Any] = {}
_providers: list[Any] = []


class _Api:
    """The OpenTelemetry names the request path uses, looked up once when the first tracer is made (an import
    statement per request costs a microsecond each)."""

    server_kind: Any = None
    propagator: Any = None
    in_context: Any = None
    error: Any = None


def tracing_enabled() -> bool:
    """Whether this process exports traces (read at server start, not per request)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(os.environ.get(ENDPOINT_ENV, "").strip())


def get_tracer(service: str, attributes: Mapping[str, str] | None = None) -> Any | None:
    """The tracer of `service` in this process, or None when tracing is off (then nothing is imported)."""
    if not tracing_enabled():
        return None
    with _lock:
        tracer = _tracers.get(service)
        if tracer is None:
            try:
                tracer = _tracers[service] = _new_tracer(service, attributes or {})
            except ImportError as e:  # the endpoint is set but the `otel` extra is not installed
                logging.getLogger("ballast").warning("%s is set but tracing needs `pip install 'ballast[otel]'` "
                                                     "(%s); not tracing", ENDPOINT_ENV, e)
                return None
        return tracer


def _new_tracer(service: str, attributes: Mapping[str, str]) -> Any:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _Api.server_kind, _Api.propagator = SpanKind.SERVER, TraceContextTextMapPropagator()
    _Api.in_context, _Api.error = set_span_in_context, Status(StatusCode.ERROR)
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service, **attributes})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if not _providers:
        atexit.register(shutdown_tracing)
    _providers.append(provider)
    return provider.get_tracer("ballast")


def shutdown_tracing() -> None:
    """Flush and stop every exporter (at exit, so the last spans of a stopping server are sent)."""
    with _lock:
        providers = list(_providers)
        _providers.clear()
        _tracers.clear()
    for p in providers:
        p.shutdown()


def start_server_span(tracer: Any, name: str, headers: Iterable[tuple[bytes, bytes]], request_id: str) -> Any:
    """A SERVER span for one HTTP request, child of the caller's `traceparent` when it sent one."""
    carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in (b"traceparent", b"tracestate")}
    parent = _Api.propagator.extract(carrier) if carrier else None
    return tracer.start_span(name, context=parent, kind=_Api.server_kind,
                             attributes={"ballast.request_id": request_id})


def trace_id_of(span: Any) -> str:
    return f"{span.get_span_context().trace_id:032x}"


def current_span() -> Any | None:
    """The server span of the request being handled, or None (tracing off, or outside a request)."""
    return span_var.get()


def traceparent(span: Any) -> str:
    """The W3C `traceparent` header naming `span` as the parent."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def set_error(span: Any, status: int) -> None:
    """HTTP status on the span; a 5xx marks it as an error (4xx are the client's, per the HTTP conventions)."""
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(_Api.error)


def current_tracer() -> Any | None:
    """The tracer that made the current server span (for child spans), or None."""
    return tracer_var.get()


def record_span(tracer: Any, parent: Any, name: str, start_ns: int, end_ns: int,
                attributes: Mapping[str, Any] | None = None) -> Any:
    """A finished child span of `parent` with given times (the engine's phases, recorded in its thread)."""
    span = tracer.start_span(name, context=_Api.in_context(parent), start_time=start_ns,
                             attributes=dict(attributes or {}))
    span.end(end_time=max(end_ns, start_ns))
    return span
