"""Opt-in capture of traffic into datasets, and `POST /v1/feedback`.

Nothing is stored unless a deployment's `capture:` section or a request's `x-ballast-capture: DATASET` header (a
key with the `capture` scope, or admin) asks for it. Successful chat completions, completions and Responses API
calls are captured, streamed or not (`capture_shapes`): the conversation sent and the assistant message returned,
with every configured pattern replaced by `[REDACTED]` here, in the gateway, before the store sees anything. A
stream is relayed untouched and its pair written after it ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ballast.control.datasets import Datasets
from ballast.control.errors import ControlError
from ballast.control.eval_store import INTERNAL_KEY_ID
from ballast.control.keys import KeyRecord
from ballast.gateway.capture_shapes import KINDS, StreamAnswer, answer, conversation
from ballast.gateway.targets import parse_model
from ballast.observe import current_request_id
from ballast.openai import APIError

if TYPE_CHECKING:
    from ballast.gateway.service import Gateway

log = logging.getLogger("ballast.capture")
HEADER = "x-ballast-capture"
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
REDACTED = "[REDACTED]"
SWEEP_S = 60.0
MAX_FEEDBACK = 2**20  # a correction is one edited answer


@dataclass(frozen=True)
class CapturePolicy:
    """A deployment's `capture:` section, as the gateway uses it."""

    dataset: str | None = None  # None: capture only on request (the header), with these patterns and retention
    sample_rate: float = 1.0
    redact: tuple[str, ...] = ()
    retention_days: float = 30.0


def redactor(patterns: tuple[str, ...]) -> Callable[[Any], Any]:
    """A function replacing every match of the patterns in every string of a JSON value."""
    compiled = [re.compile(p) for p in patterns]

    def scrub(v: Any) -> Any:
        if isinstance(v, str):
            for c in compiled:
                v = c.sub(REDACTED, v)
            return v
        if isinstance(v, list):
            return [scrub(x) for x in v]
        if isinstance(v, dict):
            return {k: scrub(x) for k, x in v.items()}
        return v

    return scrub


@dataclass(frozen=True)
class _Target:
    """Where one request's pair goes, and the conversation it sent (taken before anything is relayed)."""

    dataset: str
    deployment: str
    policy: CapturePolicy
    sent: list[Any]
    request_id: str
    key_id: str


def _correction(v: Any) -> dict[str, Any] | None:
    if v is None:
        return None
    if isinstance(v, str):
        return {"role": "assistant", "content": v}
    if isinstance(v, dict) and v.get("role", "assistant") == "assistant" and isinstance(v.get("content"), str):
        return {"role": "assistant", "content": v["content"]}
    raise APIError(400, "correction must be a string or an assistant message", param="correction",
                   code="invalid_request")


class Capture:
    def __init__(self, gateway: Gateway, datasets: Datasets):
        self.gateway = gateway
        self.datasets = datasets
        self._task: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()  # streamed pairs being written after their stream ended

    # ---- the hook in Gateway.handle ------------------------------------------------------------
    def requested(self, request: Request, key: KeyRecord) -> str | None:
        """The dataset the request's header names, checked against the key's scopes (before any work is done)."""
        name = request.headers.get(HEADER)
        if name is None:
            return None
        if "capture" not in key.scopes and "admin" not in key.scopes:
            raise APIError(403, f"this key lacks the `capture` scope needed for {HEADER}", code="insufficient_scope")
        if not DATASET_NAME.match(name):
            raise APIError(400, f"{HEADER} must be a dataset name (letters, digits, `_.-`, up to 63)",
                           code="invalid_request")
        return name

    def _policy(self, model: Any) -> tuple[str, CapturePolicy] | None:
        target = self.gateway.adapters.split(model)[0] if isinstance(model, str) else None
        dep = self.gateway.routes.get(parse_model(target)[0]) if target else None
        return (dep.name, dep.capture or CapturePolicy()) if dep is not None else None

    async def record(self, kind: str, key: KeyRecord, model: Any, parsed: Any, resp: Response,
                     wanted: str | None) -> Response:
        """Capture one answered request when its deployment or header asks for it (never fails the request).
        `model` is the one the client named (the body's was rewritten to the replica's served name). A stream
        is read as it is relayed, and its pair written once it has ended."""
        try:
            target = self._target(kind, key, model, parsed, resp, wanted)
        except Exception:
            log.exception("capturing request %s failed", current_request_id())
            return resp
        if target is None:
            return resp
        if isinstance(resp, StreamingResponse):
            resp.body_iterator = self._tap(resp.body_iterator, StreamAnswer(kind), target)
            return resp
        await self._write(target, answer(kind, bytes(resp.body)))
        return resp

    def _target(self, kind: str, key: KeyRecord, model: Any, parsed: Any, resp: Response,
                wanted: str | None) -> _Target | None:
        """Where this request's pair goes, if anywhere: opt-in by deployment (sampled) or by header."""
        if kind not in KINDS or resp.status_code != 200 or not isinstance(parsed, dict):
            return None
        if key.id == INTERNAL_KEY_ID:  # an eval's requests replay a dataset: capturing them would feed it itself
            return None
        found = self._policy(model)
        if found is None:
            return None
        deployment, policy = found
        dataset = wanted or policy.dataset
        if dataset is None or (wanted is None and random.random() >= policy.sample_rate):
            return None
        sent = conversation(kind, parsed)
        if sent is None:
            return None
        return _Target(dataset, deployment, policy, sent, current_request_id(), key.id)

    async def _tap(self, chunks: AsyncIterable[Any], stream: StreamAnswer, target: _Target) -> AsyncIterator[Any]:
        """Relay every chunk as it comes, keeping a copy for the pair; write it in the background once the
        stream has ended properly (a client gone or a replica failed mid-stream: nothing is written)."""
        try:
            async for chunk in chunks:
                try:
                    stream.feed(chunk if isinstance(chunk, bytes) else str(chunk).encode())
                except Exception:
                    stream.failed = True
                yield chunk
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        task = asyncio.create_task(self._write(target, stream.result()))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, target: _Target, answer: dict[str, Any] | None) -> None:
        if answer is None:
            return
        try:
            scrub = redactor(target.policy.redact)
            await asyncio.to_thread(self.datasets.capture, target.dataset, target.request_id, target.key_id,
                                    target.deployment, scrub(target.sent), scrub(answer),
                                    target.policy.retention_days)
        except Exception:
            log.exception("capturing request %s failed", target.request_id)

    # ---- feedback ------------------------------------------------------------------------------
    async def feedback(self, request: Request) -> Response:
        key = self.gateway.authenticate(request, "inference")
        raw = await request.body()
        if len(raw) > MAX_FEEDBACK:
            raise APIError(413, f"request body exceeds {MAX_FEEDBACK} bytes", code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
        rid = body.get("request_id") if isinstance(body, dict) else None
        if not isinstance(rid, str) or not 0 < len(rid) <= 64:
            raise APIError(400, "request_id must be the id of a captured request", param="request_id",
                           code="invalid_request")
        rating = body.get("rating")
        if (rating is not None and not isinstance(rating, int | float | str)) or (isinstance(rating, str) and len(
                rating) > 64):
            raise APIError(400, "rating must be a number or a short string", param="rating", code="invalid_request")
        correction = _correction(body.get("correction"))
        if rating is None and correction is None:
            raise APIError(400, "give a rating, a correction or both", code="invalid_request")
        try:
            out = await asyncio.to_thread(self.datasets.feedback, rid, key.id, "admin" in key.scopes, rating,
                                          correction, self._scrub_for)
        except ControlError as e:
            raise APIError(e.status, e.message, param=e.param, code=e.code) from None
        return JSONResponse({"object": "feedback", **out})

    def _scrub_for(self, deployment: str | None) -> Callable[[Any], Any]:
        dep = self.gateway.routes.get(deployment or "")
        return redactor(dep.capture.redact if dep is not None and dep.capture is not None else ())

    def routes(self) -> list[tuple[str, Callable[[Request], Awaitable[Response]], list[str]]]:
        return [("/v1/feedback", self.feedback, ["POST"])]

    # ---- retention (a gateway companion) -------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._sweep_loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        if self._writes:  # pairs of streams that just ended: let them land
            await asyncio.wait(set(self._writes), timeout=5)

    async def _sweep_loop(self) -> None:
        while True:
            try:
                n = await asyncio.to_thread(self.datasets.sweep)
                if n:
                    log.info("deleted %d captured examples past their retention", n)
            except Exception:
                log.exception("the capture retention sweep failed")
            await asyncio.sleep(SWEEP_S)
