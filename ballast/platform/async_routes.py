"""REST routes of async inference: the webhook signing secret (admin only; shown once, when created)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ballast.control import ControlPlane
from ballast.control.webhooks import WebhookSecrets
from ballast.gateway.auth import MISSING_KEY_MESSAGE, api_key_from_headers
from ballast.openai import APIError
from ballast.platform.auth import lookup


def _admin(request: Request) -> None:
    secret = api_key_from_headers(request.headers)
    if not secret:
        raise APIError(401, MISSING_KEY_MESSAGE, code="missing_api_key")
    control: ControlPlane = request.app.state.control
    key = lookup(control.sessions, secret)
    if key is None:
        raise APIError(401, "invalid API key", code="invalid_api_key")
    if "admin" not in (key.scopes or []):
        raise APIError(403, "managing the webhook secret needs the admin scope", code="insufficient_scope")


def async_router() -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["async"])

    @router.post("/webhook_secret", status_code=201)
    async def rotate_webhook_secret(request: Request) -> dict[str, Any]:
        """Create (or rotate) the secret that signs async webhooks (Standard Webhooks); shown only here."""
        await run_in_threadpool(_admin, request)
        control: ControlPlane = request.app.state.control
        secret = await run_in_threadpool(WebhookSecrets(control.sessions).rotate)
        return {"secret": secret, "note": "shown once: verify webhook-signature with it (Standard Webhooks)"}

    return router
