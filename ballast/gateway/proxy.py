"""Forwarding one request to a replica, with retries, ejection and unbuffered streaming.

A replica that refuses the connection, resets it, or answers 503 before sending a byte is retried on
another replica (bounded attempts); replicas that keep failing are ejected for a while. Once bytes
have reached the client a request is never retried: a replica dying mid-stream ends the stream with
an SSE error event, never a silent truncation.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.responses import Response, StreamingResponse

from ballast.gateway.routing import Endpoint, Router
from ballast.openai import APIError, sse_event

log = logging.getLogger("ballast.gateway")

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "server", "date",
        "x-request-id"}
_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
              httpx.WriteError, httpx.PoolTimeout)


@dataclass
class Outcome:
    """What the gateway learned from a request, for metering and metrics."""

    endpoint: Endpoint | None = None
    status: int = 0
    attempts: int = 0
    usage: dict[str, Any] | None = None
    first_byte_s: float | None = None  # response headers from the replica
    first_chunk_s: float | None = None  # first body chunk of a stream (time to first token)
    stream_s: float | None = None  # from the first chunk to the end of the stream
    error: bool = False


class Proxy:
    def __init__(
        self, router: Router, *, max_attempts: int = 3, eject_after: int = 3, eject_s: float = 10.0,
        on_retry: Callable[[Endpoint], None] | None = None, on_eject: Callable[[Endpoint], None] | None = None,
    ):
        self.router = router
        self.max_attempts = max_attempts
        self.eject_after = eject_after
        self.eject_s = eject_s
        self.on_retry = on_retry
        self.on_eject = on_eject
        limits = httpx.Limits(max_connections=4096, max_keepalive_connections=1024, keepalive_expiry=30)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=3.0), limits=limits)

    async def aclose(self) -> None:
        await self.client.aclose()

    def _failed(self, ep: Endpoint, hard: bool) -> None:
        ep.consecutive_failures += 1
        if hard or ep.consecutive_failures >= self.eject_after:
            # A refused connection means the process is gone: eject at once, briefly; repeated
            # failures eject for longer.
            ep.ejected_until = time.monotonic() + (self.eject_s if not hard else min(self.eject_s, 2.0)
                                                   * ep.consecutive_failures)
            if self.on_eject:
                self.on_eject(ep)

    async def forward(
        self,
        endpoints: Callable[[], Sequence[Endpoint]],
        path: str,
        body: bytes,
        headers: dict[str, str],
        *,
        key: bytes | None,
        outcome: Outcome,
        on_done: Callable[[Outcome], None],
        extract_usage: bool,
        strip_usage: bool = False,
        timeout_s: float | None = None,
    ) -> Response:
        """Send to a chosen replica; `on_done` runs once the response has been fully relayed."""
        tried: set[str] = set()
        started = time.monotonic()
        last_error = "no ready replica"
        for _ in range(self.max_attempts):
            ep = self.router.choose(endpoints(), key=key, exclude=tried)
            if ep is None:
                break
            if tried and self.on_retry:
                self.on_retry(ep)
            tried.add(ep.replica_id)
            outcome.attempts += 1
            ep.outstanding += 1
            req = self.client.build_request(
                "POST", ep.url + path, content=body, headers=headers,
                timeout=httpx.Timeout(timeout_s, connect=3.0),
            )
            try:
                resp = await self.client.send(req, stream=True)
            except _RETRYABLE as e:
                ep.outstanding -= 1
                self._failed(ep, hard=isinstance(e, httpx.ConnectError))
                last_error = f"{type(e).__name__} from replica {ep.replica_id}"
                continue
            except BaseException:
                ep.outstanding -= 1
                raise
            if resp.status_code == 503:
                await resp.aclose()
                ep.outstanding -= 1
                self._failed(ep, hard=False)
                last_error = f"replica {ep.replica_id} answered 503"
                continue
            ep.consecutive_failures = 0
            ep.served += 1
            outcome.endpoint = ep
            outcome.status = resp.status_code
            outcome.first_byte_s = time.monotonic() - started
            out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
            if resp.headers.get("content-type", "").startswith("text/event-stream"):
                return StreamingResponse(
                    self._relay(resp, ep, outcome, on_done, extract_usage, started, strip_usage),
                    status_code=resp.status_code,
                    headers=out_headers,
                )
            try:
                content = await resp.aread()
            except _RETRYABLE:
                # The replica died after its headers: nothing reached the client yet, but the
                # request may have run; report it rather than risk running it twice.
                ep.outstanding -= 1
                self._failed(ep, hard=True)
                outcome.error = True
                outcome.status = 502
                on_done(outcome)
                raise APIError(502, "the replica failed while answering; retry the request",
                               code="replica_failed") from None
            finally:
                await resp.aclose()
            ep.outstanding -= 1
            if extract_usage and resp.status_code == 200:
                outcome.usage = _usage_from_json(content)
            outcome.error = resp.status_code >= 500
            on_done(outcome)
            return Response(content, status_code=resp.status_code, headers=out_headers)
        outcome.status = 503
        outcome.error = True
        on_done(outcome)
        raise APIError(503, f"no replica could take the request ({last_error}); retry shortly",
                       code="no_replica_available", headers={"Retry-After": "1"})

    async def _relay(
        self, resp: httpx.Response, ep: Endpoint, outcome: Outcome, on_done: Callable[[Outcome], None],
        extract_usage: bool, started: float, strip_usage: bool = False,
    ) -> AsyncIterator[bytes]:
        """Relay chunks as they come. With `strip_usage` (the gateway asked for the usage chunk, the client
        did not) the usage-only event is taken out of the stream, so clients see exactly what they asked for."""
        tail = b""
        pending = b""
        first = 0.0
        try:
            async for chunk in resp.aiter_raw():
                if not first:
                    first = time.monotonic()
                    outcome.first_chunk_s = first - started
                if strip_usage:
                    pending += chunk
                    cut = pending.rfind(b"\n\n")
                    if cut < 0:
                        continue
                    chunk, pending = pending[: cut + 2], pending[cut + 2:]
                    if b'"choices":[]' in chunk:
                        kept = []
                        for event in chunk.split(b"\n\n"):
                            if event.startswith(b"data: {") and b'"choices":[]' in event:
                                outcome.usage = _usage_from_sse(event) or outcome.usage
                            elif event:
                                kept.append(event + b"\n\n")
                        chunk = b"".join(kept)
                        if not chunk:
                            continue
                elif extract_usage:
                    tail = (tail + chunk)[-4096:]
                yield chunk
            if pending:
                yield pending
        except _RETRYABLE as e:
            outcome.error = True
            self._failed(ep, hard=True)
            log.warning("replica %s failed mid-stream: %s", ep.replica_id, type(e).__name__)
            err = APIError(502, "the replica serving this stream failed; the response is incomplete",
                           code="stream_interrupted")
            yield sse_event(err.body(), event="error")
        finally:
            ep.outstanding -= 1
            await resp.aclose()
            if first:
                outcome.stream_s = time.monotonic() - first
            if extract_usage and tail:
                outcome.usage = _usage_from_sse(tail)
            on_done(outcome)


def _usage_from_json(content: bytes) -> dict[str, Any] | None:
    try:
        u = json.loads(content).get("usage")
    except (ValueError, AttributeError):
        return None
    return u if isinstance(u, dict) else None


def _usage_from_sse(tail: bytes) -> dict[str, Any] | None:
    """The usage chunk (choices: []) is the last data event before [DONE]."""
    for event in reversed(tail.split(b"\n\n")):
        event = event.strip()
        if not event.startswith(b"data: {") or b'"usage"' not in event:
            continue
        try:
            u = json.loads(event[6:]).get("usage")
        except ValueError:
            continue
        if isinstance(u, dict):
            return u
    return None
