"""Async request routes on the gateway: submit (`/deployments/{name}/async_predict`, `/v1/async/...`), status,
cancel and the kept result. Submission checks the key, its deployments and limits like a synchronous
request, validates the options and the webhook target, and answers 201 once the request is in the store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ballast.control.async_queue import AsyncQueue, Submission
from ballast.control.errors import ControlError
from ballast.control.group_commit import SubmitBatcher
from ballast.control.keys import KeyRecord
from ballast.control.webhooks import IPNet, check_target, literal_host
from ballast.gateway.async_dispatch import Dispatcher, queued_deployment
from ballast.gateway.service import Gateway, _read_body
from ballast.gateway.targets import model_of_path
from ballast.openai import APIError

OPTIONS = ("webhook_endpoint", "priority", "max_time_in_queue_s")
DEFAULT_MAX_TIME_IN_QUEUE_S = 600.0
MAX_TIME_IN_QUEUE_S = 86400.0
Route = tuple[str, Callable[[Request], Awaitable[Response]], list[str]]


def _api(e: ControlError) -> APIError:
    return APIError(e.status, e.message, code=e.code, param=e.param,
                    headers={"Retry-After": "5"} if e.status == 429 else None)


def parse_options(body: dict[str, Any]) -> tuple[str | None, int, float]:
    """webhook_endpoint, priority (0 first .. 2), max_time_in_queue_s; 400 naming the field when wrong."""
    hook = body.get("webhook_endpoint")
    if hook is not None and (not isinstance(hook, str) or not hook):
        raise APIError(400, "webhook_endpoint must be a URL string", param="webhook_endpoint")
    priority = body.get("priority", 1)
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 2:
        raise APIError(400, "priority must be 0, 1 or 2 (0 runs first)", param="priority")
    wait = body.get("max_time_in_queue_s", DEFAULT_MAX_TIME_IN_QUEUE_S)
    if not isinstance(wait, int | float) or isinstance(wait, bool) or not 1 <= wait <= MAX_TIME_IN_QUEUE_S:
        raise APIError(400, f"max_time_in_queue_s must be a number of seconds from 1 to {MAX_TIME_IN_QUEUE_S:g}",
                       param="max_time_in_queue_s")
    return hook, priority, float(wait)


class AsyncAPI:
    def __init__(self, gateway: Gateway, queue: AsyncQueue, dispatcher: Dispatcher, allow: list[IPNet]):
        self.gateway = gateway
        self.queue = queue
        self.dispatcher = dispatcher
        self.allow = allow
        self.batcher = SubmitBatcher(queue)

    async def submit(self, request: Request, kind: str, model: str | None = None) -> Response:
        gw = self.gateway
        if gw.source.generation() != gw._generation:
            await gw._catch_up()
        key = gw.authenticate(request, "inference")
        _, body = await _read_body(request, parse=True)
        payload, model = _payload(body, kind, model)
        hook, priority, wait = parse_options(body)
        dep = queued_deployment(gw, model, key)
        await gw.shared.admit(gw.limiters.get(key.id))
        if hook is not None:
            try:
                if literal_host(hook):
                    check_target(hook, self.allow)  # no DNS to wait for: no thread hop either
                else:
                    await asyncio.to_thread(check_target, hook, self.allow)
            except ControlError as e:
                raise _api(e) from None
        elif dep.async_policy.result_ttl_s <= 0:
            raise APIError(400, f"give a webhook_endpoint: `{dep.name}` keeps no async results (async.result_ttl_s "
                           "is 0), so the output would be lost", param="webhook_endpoint")
        try:
            rid = await self.batcher.submit(Submission(
                dep.name, str(model), kind, key.id, {"body": payload}, hook, priority, wait,
                dep.async_policy.max_queue))
        except ControlError as e:
            raise _api(e) from None
        self.dispatcher.wake()
        return JSONResponse({"request_id": rid}, status_code=201)

    def _owned(self, request: Request) -> tuple[KeyRecord, str]:
        key = self.gateway.authenticate(request, "inference")
        return key, request.path_params["request_id"]

    async def _find(self, request: Request) -> tuple[str, dict[str, Any]]:
        key, rid = self._owned(request)
        found = await asyncio.to_thread(self.queue.get, rid)
        # Another key's request is reported as missing: ids are not to be probed.
        if found is None or (found[0] != key.id and "admin" not in key.scopes):
            raise APIError(404, f"no async request {rid}", param="request_id", code="not_found")
        return rid, found[1]

    async def status(self, request: Request) -> Response:
        _, view = await self._find(request)
        return JSONResponse(view)

    async def cancel(self, request: Request) -> Response:
        rid, _ = await self._find(request)
        try:
            view = await asyncio.to_thread(self.queue.cancel, rid)
        except ControlError as e:
            raise _api(e) from None
        return JSONResponse(view)

    async def result(self, request: Request) -> Response:
        rid, view = await self._find(request)
        res = await asyncio.to_thread(self.queue.result, rid)
        if res is None:
            raise APIError(404, f"request {rid} has no kept result (status {view['status']}; results are kept only "
                           "with async.result_ttl_s, and until it passes)", code="result_not_available")
        return JSONResponse({"request_id": rid, "status": view["status"], "http_status": res.get("status"),
                             "output": res.get("body")})

    def routes(self) -> list[Route]:
        def openai(kind: str) -> Callable[[Request], Awaitable[Response]]:
            async def h(request: Request) -> Response:
                return await self.submit(request, kind)
            return h

        async def predict(request: Request) -> Response:
            return await self.submit(request, "predict", model_of_path(request.path_params))

        async def status_or_cancel(request: Request) -> Response:
            return await (self.cancel(request) if request.method == "DELETE" else self.status(request))

        out: list[Route] = [
            ("/v1/async/chat/completions", openai("chat_completions"), ["POST"]),
            ("/v1/async/completions", openai("completions"), ["POST"]),
            ("/v1/async/embeddings", openai("embeddings"), ["POST"]),
            ("/deployments/{name}/async_predict", predict, ["POST"]),
            ("/deployments/{name}/environments/{env}/async_predict", predict, ["POST"]),
            ("/deployments/{name}/versions/{version:int}/async_predict", predict, ["POST"]),
        ]
        for base in ("/async_requests", "/v1/async_requests"):
            out.append((base + "/{request_id}", status_or_cancel, ["GET", "DELETE"]))
            out.append((base + "/{request_id}/result", self.result, ["GET"]))
        return out


def _payload(body: dict[str, Any], kind: str, model: str | None) -> tuple[Any, str | None]:
    """What the replica will receive, and the model it names (OpenAI bodies carry their own)."""
    if kind == "predict":
        if "model_input" not in body:
            raise APIError(400, "`model_input` is required: the JSON the model's predict() receives",
                           param="model_input")
        payload = body["model_input"]
        unknown = sorted(set(body) - {"model_input", *OPTIONS})
    else:
        payload = body.get("model_input", {k: v for k, v in body.items() if k not in OPTIONS})
        unknown = sorted(set(body) - {"model_input", *OPTIONS}) if "model_input" in body else []
        if not isinstance(payload, dict):
            raise APIError(400, "the request must be an OpenAI request body (a JSON object)", param="model_input")
        if payload.get("stream"):
            raise APIError(400, "async requests cannot stream; leave `stream` unset", param="stream")
        model = payload.get("model")
    if unknown:
        raise APIError(400, f"unknown field(s) {', '.join(unknown)}", param=unknown[0])
    return payload, model
