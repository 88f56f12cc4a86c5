"""Mid-stream resume: when the replica streaming an LLM answer dies, another replica carries on in the same stream.

The gateway asks the replica for an exact account of what it streamed (`x-ballast-stream-tokens: 1`: each chunk
comes after an SSE comment line with its token ids, stripped here). When the stream breaks before `[DONE]`, the
request goes to another replica of the same version with the answer so far: a chat request as a partial assistant
message to continue (`continue_final_message`), a completion as prompt + text so far, both with the exact token
ids (`ballast_resume`) and `max_tokens` reduced by them. Its chunks are relayed under the first stream's id,
`created` and model, without a second role chunk; its usage covers the whole answer. The client sees one stream
and one `[DONE]`. At most `routing.migration_limit` moves per stream.

Greedy decoding continues exactly as an undisturbed run would; with sampling the answer continues rather than
repeats. Where a continuation could not be faithful (n > 1, logprobs, tools, structured outputs, stop sequences,
several prompts) the stream ends with the SSE error event, as without resume.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from ballast.gateway.routing import Endpoint
from ballast.openai import APIError, sse_event

if TYPE_CHECKING:
    from ballast.gateway.proxy import Outcome, Proxy

log = logging.getLogger("ballast.gateway")

STREAM_TOKENS_HEADER = "x-ballast-stream-tokens"  # the replica's runtime reads the same name
_RETRYABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)
_REPORT = b": ballast "
_REPORT_LINE = re.compile(rb"^: ballast [^\n]*\n", re.M)


@dataclass(frozen=True)
class ResumePlan:
    """A stream that may move: its kind, the body its replica was sent, and how many moves it may make."""

    kind: str
    body: dict[str, Any]
    limit: int


def unfaithful(kind: str, p: dict[str, Any]) -> str | None:
    """Why continuing this request on another replica would not give the answer it asked for, or None."""
    if p.get("n", 1) != 1 or p.get("best_of") not in (None, 1):
        return "n > 1"
    if (p.get("logprobs") is not None and p.get("logprobs") is not False) or p.get("top_logprobs"):
        return "logprobs"
    if any(p.get(k) for k in ("tools", "functions", "tool_choice")):
        return "tool calls"
    rf = p.get("response_format")
    if (isinstance(rf, dict) and rf.get("type") not in (None, "text")) or any(
            k.startswith("guided_") and p[k] for k in p):
        return "structured output"
    if p.get("stop"):
        return "stop sequences (text is held back while one may be forming)"
    if any(p.get(k) for k in ("echo", "suffix", "continue_final_message", "ballast_resume")):
        return "the request shapes its own prompt"
    if kind == "completions" and not isinstance(p.get("prompt"), str):
        return "several prompts or token ids"
    return None


def resume_plan(kind: str, parsed: Any, llm: bool, limit: int, headers: dict[str, str]) -> ResumePlan | None:
    """A plan when this request is an LLM stream that can be resumed faithfully; its replica is then asked to
    report the tokens it streams (in `headers`)."""
    if not llm or limit <= 0 or kind not in ("chat_completions", "completions") or not isinstance(parsed, dict):
        return None
    if parsed.get("stream") is not True or unfaithful(kind, parsed) is not None:
        return None
    headers[STREAM_TOKENS_HEADER] = "1"
    return ResumePlan(kind, parsed, limit)


def interrupted_event() -> bytes:
    err = APIError(502, "the replica serving this stream failed; the response is incomplete", code="stream_interrupted")
    return sse_event(err.body(), event="error")


class StreamLog:
    """What of the answer reached the client: token ids, text, the stream's identity; rewrites resumed chunks."""

    def __init__(self, plan: ResumePlan, outcome: Outcome, strip_usage: bool):
        self.plan, self.outcome, self.strip_usage = plan, outcome, strip_usage
        self.buf = b""
        self.ids: list[int] = []
        self.prompt_tokens: int | None = None
        self.text = ""
        self.meta: dict[str, Any] = {}  # id, created, model of the stream the client sees
        self.role_sent = self.finished = self.usage_sent = self.done = self.ended = False
        self.exact = True  # every chunk came with its token report
        self.resumed = False
        self._raw: list[bytes] = []  # content events relayed unchanged (with their reports)

    def feed(self, chunk: bytes) -> bytes:
        """The complete events received so far, as the client gets them."""
        self.buf += chunk
        cut = self.buf.rfind(b"\n\n")
        if cut < 0:
            return b""
        events, self.buf = self.buf[: cut + 2], self.buf[cut + 2:]
        if not self.resumed and b'"choices":[]' not in events and b"data: [DONE]" not in events \
                and b"event:" not in events:
            # Content chunks only (the common case): kept whole, parsed only if the stream breaks; reports cut out.
            self._raw.append(events)
            if events.startswith(_REPORT) and events.count(_REPORT) == 1:  # one event: no regex needed
                return events[events.index(b"\n") + 1:]
            return _REPORT_LINE.sub(b"", events)
        return b"".join(self._event(e) for e in events.split(b"\n\n") if e)

    def _event(self, whole: bytes) -> bytes:
        report, ev = None, whole
        if ev.startswith(_REPORT):
            report, _, ev = ev.partition(b"\n")
        if ev == b"data: [DONE]":
            self.done = True
            return ev + b"\n\n"
        if not ev.startswith(b"data: {"):
            self.ended = self.ended or ev.startswith(b"event: error")
            return ev + b"\n\n"
        payload = ev[6:]
        if b'"choices":[]' in payload:
            return self._usage(payload)
        if self.resumed:
            self._count(report)
            return self._rewrite(payload)
        self._raw.append(whole)
        return ev + b"\n\n"

    def _count(self, line: bytes | None) -> None:
        report = _json(line[len(_REPORT):]) if line is not None else None
        if not isinstance(report, dict) or not isinstance(report.get("ids"), list):
            self.exact = False
            return
        self.ids += report["ids"]
        if self.prompt_tokens is None and isinstance(report.get("p"), int):
            self.prompt_tokens = report["p"]

    def _usage(self, payload: bytes) -> bytes:
        obj = _json(payload)
        if not isinstance(obj, dict):
            return b""
        if isinstance(obj.get("usage"), dict):
            self.outcome.usage = obj["usage"]
        if self.strip_usage:
            return b""
        self.usage_sent = True
        return sse_event(obj | self.meta) if self.resumed else b"data: " + payload + b"\n\n"

    def _fold(self, obj: Any) -> None:
        """Take in one chunk the client got."""
        if not isinstance(obj, dict):
            return
        if not self.meta:
            self.meta = {k: obj.get(k) for k in ("id", "created", "model")}
        for c in obj.get("choices") or ():
            delta = c.get("delta") or {}
            self.role_sent = self.role_sent or "role" in delta
            self.text += delta.get("content") or c.get("text") or ""
            self.finished = self.finished or c.get("finish_reason") is not None

    def _rewrite(self, payload: bytes) -> bytes:
        """A resumed replica's chunk, under the first stream's identity; its role chunk is not repeated."""
        obj = _json(payload)
        if not isinstance(obj, dict):
            return b""
        choices = obj.get("choices") or [{}]
        role_only = all("role" in (c.get("delta") or {}) and not (c.get("delta") or {}).get("content")
                        and c.get("finish_reason") is None for c in choices)
        if role_only and self.role_sent:
            return b""
        self._fold(obj)
        return sse_event(obj | self.meta)

    def settle(self) -> None:
        """The stream broke: read what the client got of it."""
        for ev in (e for block in self._raw for e in block.split(b"\n\n") if e):
            report = None
            if ev.startswith(_REPORT):
                report, _, ev = ev.partition(b"\n")
            if ev.startswith(b"data: {"):
                self._count(report)
                self._fold(_json(ev[6:]))
        self._raw = []
        self.buf = b""  # an event cut off mid-way never reached the client

    def why_not(self) -> str | None:
        return None if self.exact else "the replica did not report its tokens"

    def continuation(self) -> bytes | None:
        """The request that carries on from here, or None when its token budget is spent."""
        body = dict(self.plan.body)
        for name in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(name), int):
                body[name] -= len(self.ids)
                if body[name] < 1:
                    return None
        if self.plan.kind == "chat_completions":
            body["messages"] = [*body["messages"], {"role": "assistant", "content": self.text}]
            body.update(continue_final_message=True, add_generation_prompt=False,
                        ballast_resume={"token_ids": self.ids})
        else:
            body["prompt"] = body["prompt"] + self.text
            body["ballast_resume"] = {"token_ids": self.ids, "chars": len(self.text)}
        return json.dumps(body).encode()

    def closing(self) -> bytes:
        """The answer was whole when the replica died (finish sent, no [DONE]): its usage and [DONE]."""
        out = b""
        if self.outcome.usage is None or not self.usage_sent:
            prompt = self.prompt_tokens or 0
            self.outcome.usage = {"prompt_tokens": prompt, "completion_tokens": len(self.ids),
                                  "total_tokens": prompt + len(self.ids)}
            if not self.strip_usage:
                obj = "chat.completion.chunk" if self.plan.kind == "chat_completions" else "text_completion"
                out = sse_event({**self.meta, "object": obj, "choices": [], "usage": self.outcome.usage})
        return out + b"data: [DONE]\n\n"


class ResumingRelay:
    """Relays a stream; when its replica dies, continues it on another (see the module docstring)."""

    def __init__(self, proxy: Proxy, plan: ResumePlan, outcome: Outcome, on_done: Callable[[Outcome], None],
                 strip_usage: bool, started: float, reopen: Callable[[bytes, set[str]], Any]):
        self.proxy, self.plan, self.outcome, self.on_done = proxy, plan, outcome, on_done
        self.log = StreamLog(plan, outcome, strip_usage)
        self.started = started
        self.reopen = reopen

    async def run(self, resp: aiohttp.ClientResponse, ep: Endpoint) -> AsyncIterator[bytes]:
        moves, first = 0, 0.0
        tried = {ep.replica_id}
        try:
            while True:
                complete = False
                try:
                    async for chunk in resp.content.iter_any():
                        if not first:
                            first = time.monotonic()
                            self.outcome.first_chunk_s = first - self.started
                        out = self.log.feed(chunk)
                        if out:
                            yield out
                    complete = True
                except _RETRYABLE:
                    pass
                finally:
                    ep.outstanding -= 1
                    resp.release() if complete else resp.close()
                if self.log.done or self.log.ended:
                    return
                got = await self._move(ep, moves, tried)
                if isinstance(got, bytes):
                    yield got
                    return
                resp, ep = got
                moves += 1
        finally:
            if first:
                self.outcome.stream_s = time.monotonic() - first
            self.on_done(self.outcome)

    async def _move(self, dead: Endpoint, moves: int,
                    tried: set[str]) -> bytes | tuple[aiohttp.ClientResponse, Endpoint]:
        """The dead replica's stream goes on elsewhere; or the bytes that end it (the answer's end, or an error)."""
        self.proxy._failed(dead, hard=True)
        self.log.settle()
        if self.log.finished and self.log.exact:
            return self.log.closing()
        why = self.log.why_not() or ("migration limit reached" if moves >= self.plan.limit else None)
        body = None if why else self.log.continuation()
        got = await self.reopen(body, tried) if body is not None else None
        if got is None:
            self.outcome.error = True
            log.warning("replica %s failed mid-stream; not resumed (%s)", dead.replica_id,
                        why or "no replica took the continuation")
            return interrupted_event()
        resp, ep = got
        self.log.resumed = True
        log.warning("stream_resumed: replica %s failed mid-stream after %d tokens; continuing on %s",
                    dead.replica_id, len(self.log.ids), ep.replica_id)
        if self.proxy.on_resume:
            self.proxy.on_resume(ep)
        return resp, ep


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None
