"""Opt-in capture of traffic into datasets, and `POST /v1/feedback`.

Nothing is stored unless a deployment's `capture:` section or a request's `x-ballast-capture: DATASET` header (a
key with the `capture` scope, or admin) asks for it. Only successful, non-streamed chat completions are captured:
the conversation sent and the assistant message returned, with every configured pattern replaced by
`[REDACTED]` here, in the gateway, before the store sees anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ballast.control.datasets import Datasets
from ballast.control.errors import ControlError
from ballast.control.eval_store import INTERNAL_KEY_ID
from ballast.control.keys import KeyRecord
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

    async def record(self, kind: str, key: KeyRecord, parsed: Any, resp: Response, wanted: str | None) -> Response:
        """Capture one answered request when its deployment or header asks for it (never fails the request)."""
        await self._record(kind, key, parsed, resp, wanted)
        return resp

    async def _record(self, kind: str, key: KeyRecord, parsed: Any, resp: Response, wanted: str | None) -> None:
        if kind != "chat_completions" or resp.status_code != 200 or isinstance(resp, StreamingResponse):
            return
        if key.id == INTERNAL_KEY_ID:  # an eval's requests replay a dataset: capturing them would feed it itself
            return
        found = self._policy(parsed.get("model") if isinstance(parsed, dict) else None)
        if found is None:
            return
        deployment, policy = found
        dataset = wanted or policy.dataset
        if dataset is None or (wanted is None and random.random() >= policy.sample_rate):
            return
        try:
            answer = json.loads(bytes(resp.body))["choices"][0]["message"]
            scrub = redactor(policy.redact)
            await asyncio.to_thread(self.datasets.capture, dataset, current_request_id(), key.id, deployment,
                                    scrub(parsed["messages"]), scrub(answer), policy.retention_days)
        except Exception:
            log.exception("capturing request %s failed", current_request_id())

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

    async def _sweep_loop(self) -> None:
        while True:
            try:
                n = await asyncio.to_thread(self.datasets.sweep)
                if n:
                    log.info("deleted %d captured examples past their retention", n)
            except Exception:
                log.exception("the capture retention sweep failed")
            await asyncio.sleep(SWEEP_S)
