"""A real loopback OTLP/HTTP trace receiver: Starlette on uvicorn, `POST /v1/traces` with protobuf bodies,
decoded with opentelemetry-proto into plain dicts (one per span)."""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from ballast.observe import free_port


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


class OTLPReceiver:
    """Collects every span it is sent; `spans()` and `wait_for()` read them (bounded waits)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.posts = 0
        self._spans: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.app = app = Starlette()
        app.add_route("/v1/traces", self._traces, methods=["POST"])
        app.add_route("/count", self._count, methods=["GET"])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def start(self, timeout: float = 10) -> OTLPReceiver:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline:
                raise AssertionError("the OTLP receiver did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)

    async def _traces(self, request: Request) -> Response:
        body = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        spans = []
        for rs in req.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append({
                        "service": resource.get("service.name"), "resource": resource, "name": s.name,
                        "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                        "parent_id": s.parent_span_id.hex(), "kind": s.kind, "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano, "attributes": _attrs(s.attributes), "status": s.status.code,
                    })
        with self._lock:
            self.posts += 1
            self._spans += spans
        return Response(ExportTraceServiceResponse().SerializeToString(), media_type="application/x-protobuf")

    async def _count(self, _request: Request) -> Response:
        return Response(str(len(self.spans())), media_type="text/plain")

    def spans(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, what: str, cond: Callable[[list[dict[str, Any]]], Any], timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = cond(self.spans())
            if got:
                return got
            time.sleep(0.05)
        names = [(s["service"], s["name"]) for s in self.spans()]
        raise AssertionError(f"timed out waiting for {what}; spans: {names}")



if __name__ == "__main__":  # `python -m tests.observe.otlp_receiver PORT` (bench/tracing.py): serve until killed
    import sys

    asyncio.run(OTLPReceiver(int(sys.argv[1])).server.serve())
