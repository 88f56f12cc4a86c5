"""OpenAI Batch API routes on the gateway: `/v1/files` and `/v1/batches`, so the openai SDK works unchanged.

Keys need the inference scope; a key sees only its own files and batches (an admin key sees all). Creating
a batch resolves every line's `model` against the caller's key first; lines that cannot run (unknown or
forbidden deployments, another endpoint) make the batch `failed` with errors naming them, as OpenAI does,
and nothing of it is queued, so a batch never fails half-queued.
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


def _limit(request: Request, default: int, most: int) -> int:
    raw = request.query_params.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise APIError(400, f"limit must be from 1 to {most}", param="limit")
    return int(raw)


def _expires_after(anchor: object, seconds: object) -> float | None:
    """The upload's `expires_after` (anchor `created_at`, seconds), None when not given."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise APIError(400, "expires_after[anchor] must be `created_at`", param="expires_after")
    if not isinstance(seconds, str) or not seconds.isdigit():
        raise APIError(400, "expires_after[seconds] must be a whole number of seconds", param="expires_after")
    return float(seconds)


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
            expires_after_s = _expires_after(form.get("expires_after[anchor]"), form.get("expires_after[seconds]"))
            content = await upload.read(MAX_BODY + 1)
            if len(content) > MAX_BODY:
                raise APIError(413, f"the file exceeds {MAX_BODY} bytes", code="request_too_large")
            view = await self._call(self.store.create_file, key.id, upload.filename or "input.jsonl", purpose,
                                    content, expires_after_s)
        finally:
            await form.close()
        return JSONResponse(view)

    async def files(self, request: Request) -> Response:
        key, admin = self._key(request)
        limit = _limit(request, default=10_000, most=10_000)
        return JSONResponse(await self._call(self.store.list_files, key.id, admin, limit,
                                             request.query_params.get("after"), request.query_params.get("purpose")))

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
        try:
            lines: list[Line] = await asyncio.to_thread(self.store.input_lines, file_id, key.id, admin)
        except ControlError as e:
            if e.status != 400:
                raise _api(e) from None
            lines, errors = [], [{"code": e.code, "message": e.message, "param": "input_file_id", "line": None}]
        else:
            resolved, errors = self._resolve(lines, endpoint, key)
        common = {"key_id": key.id, "input_file_id": file_id, "endpoint": str(endpoint), "completion_window": window,
                  "metadata": metadata}
        if errors:  # as OpenAI reports a file that fails validation: a `failed` batch listing why, nothing queued
            return JSONResponse(await self._call(self.store.fail_batch, **common, errors=errors))
        view = await self._call(self.store.create_batch, **common, lines=resolved)
        self.dispatcher.wake()
        return JSONResponse(view)

    def _resolve(self, lines: list[Line], endpoint: object, key: KeyRecord
                 ) -> tuple[list[tuple[Line, str]], list[dict[str, Any]]]:
        """(each line with the deployment it runs on, the problems of the lines that cannot run)."""
        resolved: list[tuple[Line, str]] = []
        errors: list[dict[str, Any]] = []
        for n, line in enumerate(lines, 1):
            if line.url != endpoint:
                errors.append({"code": "invalid_url", "line": n, "param": "url",
                               "message": f"request {n} (custom_id `{line.custom_id}`) is for {line.url}, not the "
                                          f"batch's endpoint {endpoint}"})
                continue
            try:
                resolved.append((line, queued_deployment(self.gateway, line.body["model"], key).name))
            except APIError as e:
                errors.append({"code": e.code or "invalid_request", "line": n, "param": "body.model",
                               "message": f"request {n} (custom_id `{line.custom_id}`): {e.message}"})
        return resolved, errors

    async def batches(self, request: Request) -> Response:
        key, admin = self._key(request)
        return JSONResponse(await self._call(self.store.list_batches, key.id, admin, _limit(request, 20, 100),
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
