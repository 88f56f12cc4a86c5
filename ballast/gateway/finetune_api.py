"""OpenAI fine-tuning routes on the gateway (`/v1/fine_tuning/jobs...`), so the openai SDK's
`client.fine_tuning.jobs` works unchanged. Keys need the `fine_tune` scope (or admin); a key sees only its own
jobs (an admin key sees all). Training data is a `/v1/files` upload with purpose `fine-tune`, or `dataset:NAME`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ballast.control.errors import ControlError
from ballast.control.finetune import FineTunes
from ballast.control.finetune_spec import parse_request
from ballast.gateway.batches import _limit
from ballast.gateway.service import Gateway, _read_body
from ballast.openai import APIError

Route = tuple[str, Callable[[Request], Awaitable[Response]], list[str]]
SCOPE = "fine_tune"


class FineTuneAPI:
    def __init__(self, gateway: Gateway, jobs: FineTunes, wake: Callable[[], None]):
        self.gateway = gateway
        self.jobs = jobs
        self.wake = wake

    def _key(self, request: Request) -> tuple[str, bool]:
        key = self.gateway.authenticate(request, SCOPE)
        return key.id, "admin" in key.scopes

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Response:
        try:
            return JSONResponse(await asyncio.to_thread(fn, *args))
        except ControlError as e:
            raise APIError(e.status, e.message, code=e.code, param=e.param) from None

    async def create(self, request: Request) -> Response:
        key_id, admin = self._key(request)
        _, body = await _read_body(request, parse=True)
        try:
            req = parse_request(body)
        except ControlError as e:
            raise APIError(e.status, e.message, code=e.code, param=e.param) from None
        response = await self._call(self.jobs.create, key_id, admin, req)
        self.wake()
        return response

    async def root(self, request: Request) -> Response:
        if request.method == "POST":
            return await self.create(request)
        key_id, admin = self._key(request)
        return await self._call(self.jobs.list, key_id, admin, _limit(request, 20, 100),
                                request.query_params.get("after"))

    async def job(self, request: Request) -> Response:
        key_id, admin = self._key(request)
        return await self._call(self.jobs.get, request.path_params["job_id"], key_id, admin)

    async def cancel(self, request: Request) -> Response:
        key_id, admin = self._key(request)
        response = await self._call(self.jobs.cancel, request.path_params["job_id"], key_id, admin)
        self.wake()
        return response

    async def events(self, request: Request) -> Response:
        key_id, admin = self._key(request)
        return await self._call(self.jobs.events, request.path_params["job_id"], key_id, admin,
                                _limit(request, 20, 1000), request.query_params.get("after"))

    async def checkpoints(self, request: Request) -> Response:
        key_id, admin = self._key(request)
        return await self._call(self.jobs.checkpoints, request.path_params["job_id"], key_id, admin,
                                _limit(request, 10, 100), request.query_params.get("after"))

    def routes(self) -> list[Route]:
        return [
            ("/v1/fine_tuning/jobs", self.root, ["GET", "POST"]),
            ("/v1/fine_tuning/jobs/{job_id}", self.job, ["GET"]),
            ("/v1/fine_tuning/jobs/{job_id}/cancel", self.cancel, ["POST"]),
            ("/v1/fine_tuning/jobs/{job_id}/events", self.events, ["GET"]),
            ("/v1/fine_tuning/jobs/{job_id}/checkpoints", self.checkpoints, ["GET"]),
        ]
