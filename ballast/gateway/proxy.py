"""Forwarding one request to a replica, with retries, ejection and unbuffered streaming.

A replica that refuses the connection, resets it, or answers 503 before sending a byte is retried on
another replica (bounded attempts); replicas that keep failing are ejected for a while. So is a whole
(non-streamed) answer cut off before the gateway holds all of it: the client has received nothing, and
a model's answer is a function of its input, so the repeat is what the client's own retry would do,
only sooner (a kill -9 between the replica's header and body writes otherwise surfaces as a 502). A replica whose
queue is full (429) sends the request to another one too; if all are full, the client gets the 429. Once bytes
have reached the client a request is never retried: a replica dying mid-stream ends the stream with
an SSE error event, never a silent truncation, unless the stream is an LLM answer that another replica can
continue (`resume.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from starlette.responses import Response, StreamingResponse

from ballast.gateway.resume import ResumePlan, ResumingRelay, resume_plan
from ballast.gateway.routing import Endpoint, Router
from ballast.observe import HOP_BY_HOP
from ballast.observe.replica_auth import headers_for
from ballast.openai import APIError, sse_event

log = logging.getLogger("ballast.gateway")

__all__ = ["Outcome", "Proxy", "resume_plan"]
_HOP = HOP_BY_HOP  # the one list, shared with the replica's command-engine proxy
# Connection refused or reset, the replica closing the connection, or a connect timeout: the request did
# not get an answer, so it is safe to send it to another replica (the replica died or never took it).
_RETRYABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)
_CONNECT = (aiohttp.ClientConnectorError, asyncio.TimeoutError)


@dataclass
class Outcome:
    """What the gateway learned from a request, for metering and metrics."""

    endpoint: Endpoint | None = None
    status: int = 0
    usage: dict[str, Any] | None = None
    first_byte_s: float | None = None  # response headers from the replica
    first_chunk_s: float | None = None  # first body chunk of a stream (time to first token)
    stream_s: float | None = None  # from the first chunk to the end of the stream
    error: bool = False


@dataclass
class _Again:
    """A try that got no answer: why, the 429 to show if every replica is busy, and whether the replica may
    have started on the request (a connection that never opened did not)."""

    why: str
    busy: Response | None = None
    started: bool = False


class Proxy:
    def __init__(
        self, router: Router, *, max_attempts: int = 3, eject_after: int = 3, eject_s: float = 10.0,
        on_retry: Callable[[Endpoint], None] | None = None, on_eject: Callable[[Endpoint], None] | None = None,
        on_resume: Callable[[Endpoint], None] | None = None,
    ):
        self.router = router
        self.max_attempts = max_attempts
        self.eject_after = eject_after
        self.eject_s = eject_s
        self.on_retry = on_retry
        self.on_eject = on_eject
        self.on_resume = on_resume
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        # aiohttp (C-accelerated HTTP parsing, cheap connection pool) rather than httpx: the gateway's cost per
        # request is mostly its upstream client. Created lazily: it binds to the running event loop.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=None,
                                             enable_cleanup_closed=False)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=3.0),
                auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

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
        resend: bool = True,
        resume: ResumePlan | None = None,
    ) -> Response:
        """Send to a chosen replica; `on_done` runs once the response has been fully relayed. Without `resend`
        (a chain step that is not idempotent) a request a replica may have started is not sent again: only a
        connection that never opened is retried elsewhere."""
        tried: set[str] = set()
        started = time.monotonic()
        last_error = "no ready replica"
        busy: Response | None = None  # the last 429 (queue full) from a replica, if every replica is busy
        for _ in range(self.max_attempts):
            ep = self.router.choose(endpoints(), key=key, exclude=tried)
            if ep is None:
                break
            if tried and self.on_retry:
                self.on_retry(ep)
            tried.add(ep.replica_id)
            ep.outstanding += 1
            answer = await self._attempt(ep, path, body, headers, timeout_s, len(tried) < self.max_attempts)
            if isinstance(answer, _Again):
                last_error, busy = answer.why, answer.busy or busy
                if resend or not answer.started:
                    continue
                break
            resp, content = answer
            ep.consecutive_failures = 0
            if content is None:
                if resume is not None:  # an LLM stream that moves to another replica if this one dies
                    relay = ResumingRelay(self, resume, outcome, on_done, strip_usage, started,
                                          lambda b, tried: self._reopen(endpoints, path, b, headers, key, tried))
                    return StreamingResponse(relay.run(resp, ep), status_code=resp.status,
                                             headers=self._headers(resp, ep, outcome, started))
                return self._stream(resp, ep, outcome, on_done, extract_usage, started, strip_usage)
            return self._whole(resp, content, ep, outcome, on_done, extract_usage, started)
        return _no_replica(outcome, on_done, busy, last_error)

    async def _attempt(self, ep: Endpoint, path: str, body: bytes, headers: dict[str, str], timeout_s: float | None,
                       more: bool) -> _Again | tuple[aiohttp.ClientResponse, bytes | None]:
        """One try on one replica: its response with the whole body (None for a stream), or why to try again."""
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=3.0) if timeout_s else None
        try:
            resp = await self.session.post(ep.url + path, data=body, headers={**headers, **headers_for(ep.replica_id)},
                                           timeout=timeout, allow_redirects=False)
        except _RETRYABLE as e:
            ep.outstanding -= 1
            self._failed(ep, hard=isinstance(e, _CONNECT))
            return _Again(f"{type(e).__name__} from replica {ep.replica_id}",
                          started=not isinstance(e, aiohttp.ClientConnectorError))
        except BaseException:
            ep.outstanding -= 1
            raise
        status = resp.status
        if status == 429 and more:
            # That replica's queue is full (a hot prefix, say): another may have room. Not a failure.
            busy = Response(await resp.read(), status_code=429,
                            headers={k: v for k, v in resp.headers.items() if k.lower() not in _HOP})
            resp.release()
            ep.outstanding -= 1
            return _Again(f"replica {ep.replica_id} is at capacity", busy)
        if status == 503:
            resp.close()
            ep.outstanding -= 1
            self._failed(ep, hard=False)
            return _Again(f"replica {ep.replica_id} answered 503")
        if resp.content_type == "text/event-stream":
            return resp, None
        content = await self._read_whole(resp, ep)
        if content is None:
            return _Again(f"replica {ep.replica_id} failed while answering", started=True)
        return resp, content

    async def _reopen(self, endpoints: Callable[[], Sequence[Endpoint]], path: str, body: bytes,
                      headers: dict[str, str], key: bytes | None,
                      tried: set[str]) -> tuple[aiohttp.ClientResponse, Endpoint] | None:
        """A stream of the continuation `body` from a replica not tried yet for this request, or None."""
        while (ep := self.router.choose(endpoints(), key=key, exclude=tried)) is not None:
            tried.add(ep.replica_id)
            ep.outstanding += 1
            answer = await self._attempt(ep, path, body, headers, None, True)
            if isinstance(answer, _Again):
                continue
            resp, content = answer
            if content is not None:  # an answer, not a stream: the replica refused the continuation
                ep.outstanding -= 1
                log.warning("replica %s refused a stream's continuation: %s", ep.replica_id, content[:200])
                return None
            ep.consecutive_failures = 0
            return resp, ep
        return None

    def _headers(self, resp: aiohttp.ClientResponse, ep: Endpoint, outcome: Outcome, started: float) -> dict:
        outcome.endpoint = ep
        outcome.status = resp.status
        outcome.first_byte_s = time.monotonic() - started
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
        out_headers["x-ballast-replica"] = ep.replica_id  # which replica served: for debugging and tests
        return out_headers

    def _stream(
        self, resp: aiohttp.ClientResponse, ep: Endpoint, outcome: Outcome, on_done: Callable[[Outcome], None],
        extract_usage: bool, started: float, strip_usage: bool,
    ) -> Response:
        """A streamed answer, relayed to the client as it comes."""
        out_headers = self._headers(resp, ep, outcome, started)
        return StreamingResponse(
            self._relay(resp, ep, outcome, on_done, extract_usage, started, strip_usage),
            status_code=resp.status, headers=out_headers,
        )

    async def _read_whole(self, resp: aiohttp.ClientResponse, ep: Endpoint) -> bytes | None:
        """The whole body, or None when the replica died before sending all of it (then it is ejected)."""
        try:
            content = await resp.read()
        except _RETRYABLE:
            resp.close()
            ep.outstanding -= 1
            self._failed(ep, hard=True)
            return None
        except BaseException:
            resp.close()
            ep.outstanding -= 1
            raise
        resp.release()
        return content

    def _whole(
        self, resp: aiohttp.ClientResponse, content: bytes, ep: Endpoint, outcome: Outcome,
        on_done: Callable[[Outcome], None], extract_usage: bool, started: float,
    ) -> Response:
        """A whole answer, read before any of it goes to the client."""
        out_headers = self._headers(resp, ep, outcome, started)
        status = resp.status
        ep.outstanding -= 1
        if extract_usage and status == 200:
            outcome.usage = _usage_from_json(content)
        outcome.error = status >= 500
        on_done(outcome)
        return Response(content, status_code=status, headers=out_headers)

    async def _relay(
        self, resp: aiohttp.ClientResponse, ep: Endpoint, outcome: Outcome, on_done: Callable[[Outcome], None],
        extract_usage: bool, started: float, strip_usage: bool = False,
    ) -> AsyncIterator[bytes]:
        """Relay chunks as they come. With `strip_usage` (the gateway asked for the usage chunk, the client
        did not) the usage-only event is taken out of the stream, so clients see exactly what they asked for."""
        stripper = _UsageStripper(outcome) if strip_usage else None
        scanner = _UsageScanner(outcome) if extract_usage and stripper is None else None
        first = 0.0
        complete = False
        try:
            async for chunk in resp.content.iter_any():
                if not first:
                    first = time.monotonic()
                    outcome.first_chunk_s = first - started
                if stripper is not None:
                    chunk = stripper.feed(chunk)
                    if not chunk:
                        continue
                elif scanner is not None:
                    scanner.feed(chunk)
                yield chunk
            if stripper is not None and stripper.pending:
                yield stripper.pending
            complete = True
        except _RETRYABLE as e:
            yield self._interrupted(ep, outcome, e)
        finally:
            ep.outstanding -= 1
            # A stream cut short (client gone, replica failed) leaves unread bytes: drop that connection.
            resp.release() if complete else resp.close()
            if first:
                outcome.stream_s = time.monotonic() - first
            if scanner is not None:
                scanner.flush()
            on_done(outcome)

    def _interrupted(self, ep: Endpoint, outcome: Outcome, e: BaseException) -> bytes:
        """The replica died mid-stream: eject it and end the stream with an SSE error, never a silent cut."""
        outcome.error = True
        self._failed(ep, hard=True)
        log.warning("replica %s failed mid-stream: %s", ep.replica_id, type(e).__name__)
        err = APIError(502, "the replica serving this stream failed; the response is incomplete",
                       code="stream_interrupted")
        return sse_event(err.body(), event="error")


def _no_replica(outcome: Outcome, on_done: Callable[[Outcome], None], busy: Response | None,
                last_error: str) -> Response:
    """Every attempt failed: the last 429 when every replica tried was at capacity, else a 503."""
    if busy is not None:  # every replica tried is at capacity: the client should slow down
        outcome.status = 429
        outcome.error = True
        on_done(outcome)
        return busy
    outcome.status = 503
    outcome.error = True
    on_done(outcome)
    raise APIError(503, f"no replica could take the request ({last_error}); retry shortly",
                   code="no_replica_available", headers={"Retry-After": "1"})


class _UsageStripper:
    """Takes the usage-only event (`"choices":[]`) out of an SSE stream, keeping its usage in the outcome."""

    def __init__(self, outcome: Outcome):
        self.outcome = outcome
        self.pending = b""  # an incomplete event, held until its end arrives

    def feed(self, chunk: bytes) -> bytes:
        """The complete events received so far, less the usage event; b"" when there is nothing to send yet."""
        self.pending += chunk
        cut = self.pending.rfind(b"\n\n")
        if cut < 0:
            return b""
        chunk, self.pending = self.pending[: cut + 2], self.pending[cut + 2:]
        if b'"choices":[]' not in chunk:
            return chunk
        kept = []
        for event in chunk.split(b"\n\n"):
            if event.startswith(b"data: {") and b'"choices":[]' in event:
                self.outcome.usage = _usage_from_sse(event) or self.outcome.usage
            elif event:
                kept.append(event + b"\n\n")
        return b"".join(kept)


class _UsageScanner:
    """Reads the usage out of a stream relayed unchanged. Whole events only: a Responses API stream
    carries usage in a final event of any size, so an incomplete event waits for its end."""

    def __init__(self, outcome: Outcome):
        self.outcome = outcome
        self.tail = b""  # bytes after the last complete event

    def feed(self, chunk: bytes) -> None:
        self.tail += chunk
        cut = self.tail.rfind(b"\n\n")
        if cut < 0:
            return
        events, self.tail = self.tail[: cut + 2], self.tail[cut + 2:]
        if b'"usage":{' in events or b'"usage": {' in events:
            self.outcome.usage = _usage_from_sse(events) or self.outcome.usage

    def flush(self) -> None:
        """End of stream: whatever is left may still hold the usage (an event without its final blank line)."""
        if self.tail:
            self.outcome.usage = _usage_from_sse(self.tail) or self.outcome.usage


def _usage_from_json(content: bytes) -> dict[str, Any] | None:
    try:
        u = json.loads(content).get("usage")
    except (ValueError, AttributeError):
        return None
    return u if isinstance(u, dict) else None


def _usage_from_sse(tail: bytes) -> dict[str, Any] | None:
    """The last usage in these events: a chat usage chunk (choices: []), or a Responses API
    `response.completed` event (`event:` line, usage under `response`)."""
    for event in reversed(tail.split(b"\n\n")):
        data = next((ln[6:] for ln in event.strip().split(b"\n") if ln.startswith(b"data: {")), None)
        if data is None or b'"usage"' not in data:
            continue
        try:
            obj = json.loads(data)
        except ValueError:
            continue
        u = obj.get("usage")
        if u is None and isinstance(obj.get("response"), dict):
            u = obj["response"].get("usage")
        if isinstance(u, dict):
            return u
    return None
