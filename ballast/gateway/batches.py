"""OpenAI Batch API routes on the gateway: `/v1/files` and `/v1/batches`, so the openai SDK works unchanged.

Keys need the inference scope; a key sees only its own files and batches (an admin key sees all). Creating
a batch resolves every line's `model` against the caller's key first (unknown or forbidden deployments are
a 400 naming the line), so a batch never fails half-queued.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ballast.control.batches import WINDOWS, BatchStore, Line
from ballast.control.errors import ControlError
from ballast.control.keys import KeyRecord
from ballast.gateway.async_dispatch import Dispatcher, queued_deployment
from ballast.gateway.service import MAX_BODY, Gateway, _read_body
from ballast.openai import APIError

Route = tuple[str, Callable[[Request], Awaitable[Response]], list[str]]


def _api(e: ControlError) -> APIError:
    return APIError(e.status, e.message, code=e.code, param=e.param)


class BatchAPI:
    def __init__(self, gateway: Gateway, store: BatchStore, dispatcher: Dispatcher):
        self.gateway = gateway
        self.store = store
        self.dispatcher = dispatcher

    def _key(self, request: Request) -> tuple[KeyRecord, bool]:
        key = self.gateway.authenticate(request, "inference")
        return key, "admin" in key.scopes

    async def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kw)
        except ControlError as e:
            raise _api(e) from None

    # ---- files --------------------------------------------------------------------------------
    async def upload(self, request: Request) -> Response:
        key, _ = self._key(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY:
            raise APIError(413, f"the file exceeds {MAX_BODY} bytes", code="request_too_large")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(400, "upload the file as multipart/form-data with fields `file` and `purpose`",
                           param="file")
        try:
            form = await request.form(max_files=1, max_fields=8, max_part_size=MAX_BODY)
        except Exception as e:  # malformed multipart: the parser's own errors
            raise APIError(400, f"malformed multipart body: {e}", param="file") from None
        try:
            upload, purpose = form.get("file"), form.get("purpose")
            if not isinstance(upload, UploadFile):
                raise APIError(400, "the `file` field (a JSONL file) is required", param="file")
            if not isinstance(purpose, str):
                raise APIError(400, "the `purpose` field is required (batch)", param="purpose")
            content = await upload.read(MAX_BODY + 1)
            if len(content) > MAX_BODY:
                raise APIError(413, f"the file exceeds {MAX_BODY} bytes", code="request_too_large")
            view = await self._call(self.store.create_file, key.id, upload.filename or "input.jsonl", purpose,
                                    content)
        finally:
            await form.close()
        return JSONResponse(view)

    async def files(self, request: Request) -> Response:
        key, admin = self._key(request)
        data = await self._call(self.store.list_files, key.id, admin)
        return JSONResponse({"object": "list", "data": data, "has_more": False})

    async def file(self, request: Request) -> Response:
        key, admin = self._key(request)
        fid = request.path_params["file_id"]
        if request.method == "DELETE":
            return JSONResponse(await self._call(self.store.delete_file, fid, key.id, admin))
        return JSONResponse(await self._call(self.store.get_file, fid, key.id, admin))

    async def content(self, request: Request) -> Response:
        key, admin = self._key(request)
        data = await self._call(self.store.file_content, request.path_params["file_id"], key.id, admin)
        return Response(data, media_type="application/jsonl")

    # ---- batches ------------------------------------------------------------------------------
    async def create(self, request: Request) -> Response:
        key, admin = self._key(request)
        _, body = await _read_body(request, parse=True)
        if unknown := sorted(set(body) - {"input_file_id", "endpoint", "completion_window", "metadata"}):
            raise APIError(400, f"unknown field(s) {', '.join(unknown)}", param=unknown[0])
        file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
        window, metadata = body.get("completion_window"), body.get("metadata")
        if not isinstance(file_id, str):
            raise APIError(400, "input_file_id is required", param="input_file_id")
        if window not in WINDOWS:
            raise APIError(400, f"completion_window must be one of {', '.join(WINDOWS)}", param="completion_window")
        if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in metadata.items())):
            raise APIError(400, "metadata: at most 16 string pairs (keys up to 64, values up to 512 characters)",
                           param="metadata")
        lines: list[Line] = await self._call(self.store.input_lines, file_id, key.id, admin)
        resolved: list[tuple[Line, str]] = []
        for n, line in enumerate(lines, 1):
            if line.url != endpoint:
                raise APIError(400, f"request {n} (custom_id `{line.custom_id}`) is for {line.url}, not the batch's "
                               f"endpoint {endpoint}", param="endpoint")
            try:
                dep = queued_deployment(self.gateway, line.body["model"], key)
            except APIError as e:
                raise APIError(400, f"request {n} (custom_id `{line.custom_id}`): {e.message}", param="input_file_id",
                               code=e.code) from None
            resolved.append((line, dep.name))
        view = await self._call(self.store.create_batch, key_id=key.id, input_file_id=file_id, endpoint=str(endpoint),
                                completion_window=window, metadata=metadata, lines=resolved)
        self.dispatcher.wake()
        return JSONResponse(view)

    async def batches(self, request: Request) -> Response:
        key, admin = self._key(request)
        raw = request.query_params.get("limit", "20")
        if not raw.isdigit() or not 1 <= int(raw) <= 100:
            raise APIError(400, "limit must be from 1 to 100", param="limit")
        return JSONResponse(await self._call(self.store.list_batches, key.id, admin, int(raw),
                                             request.query_params.get("after")))

    async def batch(self, request: Request) -> Response:
        key, admin = self._key(request)
        return JSONResponse(await self._call(self.store.get_batch, request.path_params["batch_id"], key.id, admin))

    async def cancel(self, request: Request) -> Response:
        key, admin = self._key(request)
        return JSONResponse(await self._call(self.store.cancel_batch, request.path_params["batch_id"], key.id, admin))

    def routes(self) -> list[Route]:
        async def files_root(request: Request) -> Response:
            return await (self.upload(request) if request.method == "POST" else self.files(request))

        async def batches_root(request: Request) -> Response:
            return await (self.create(request) if request.method == "POST" else self.batches(request))

        return [
            ("/v1/files", files_root, ["GET", "POST"]),
            ("/v1/files/{file_id}", self.file, ["GET", "DELETE"]),
            ("/v1/files/{file_id}/content", self.content, ["GET"]),
            ("/v1/batches", batches_root, ["GET", "POST"]),
            ("/v1/batches/{batch_id}", self.batch, ["GET"]),
            ("/v1/batches/{batch_id}/cancel", self.cancel, ["POST"]),
        ]
