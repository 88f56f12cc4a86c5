"""The one API-key header parser, shared by the gateway and the REST API.

Accepted, in this order: `Authorization: Bearer KEY` (what the OpenAI SDKs send), `Api-Key: KEY`
(Azure OpenAI style) and `x-api-key: KEY` (Anthropic style and many HTTP tools). Header names are
case-insensitive; surrounding whitespace is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping

KEY_HEADERS = ("authorization: Bearer", "api-key", "x-api-key")
MISSING_KEY_MESSAGE = "missing API key: send `Authorization: Bearer KEY`, `Api-Key: KEY` or `x-api-key: KEY`"


def api_key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The secret a request carries, or None. `headers` must look names up case-insensitively
    (Starlette's and httpx's headers do)."""
    auth = headers.get("authorization") or ""
    if auth[:7].lower() == "bearer ":
        secret = auth[7:].strip()
        if secret:
            return secret
    for name in ("api-key", "x-api-key"):
        secret = (headers.get(name) or "").strip()
        if secret:
            return secret
    return None
