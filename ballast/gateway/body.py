"""Reading a request body at the gateway: bounded in size, and parsed as a JSON object when asked."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from ballast.openai import APIError
from ballast.openai.jsonio import parse_json

MAX_BODY = 32 * 2**20


async def _read_body(request: Request, parse: bool) -> tuple[bytes, Any]:
    """The body (bounded by MAX_BODY) and, when `parse`, its JSON object."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY:
        raise APIError(413, f"request body exceeds {MAX_BODY} bytes", code="request_too_large")
    body = await request.body()
    if len(body) > MAX_BODY:
        raise APIError(413, f"request body exceeds {MAX_BODY} bytes", code="request_too_large")
    if not parse:
        return body, None
    parsed = parse_json(body) if body else None  # 400 for deep nesting and lone surrogates, as the replica
    if not isinstance(parsed, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_request")
    return body, parsed
