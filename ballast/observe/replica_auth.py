"""Replicas on other machines answer only the platform: a per-replica token in one header.

A Ray replica listens on its node's address, where anyone who reaches the node could otherwise call the model
without an API key, bypassing the gateway's keys, limits and metering. The platform keeps one secret in its store
(shared by every platform process on that store) and gives each Ray replica HMAC(secret, replica id) in
`BALLAST_REPLICA_TOKEN`; the replica takes it out of its environment before any user code runs (so one
deployment's code cannot learn a token that opens another's replicas) and then refuses every request without it
but the health probes. Whoever in the platform calls a replica (gateway, metrics sampler, canary guard, a chain's
direct hops) derives the token from the replica id. Local replicas listen on loopback and get no token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from functools import lru_cache
from typing import Any

HEADER = "x-ballast-replica-token"
ENV = "BALLAST_REPLICA_TOKEN"
OPEN_PATHS = frozenset({"/health", "/health/live", "/health/ready"})  # probes: they reveal no model data

_secret: list[bytes] = []  # the platform's secret, once set in this process (one platform per process)


def set_secret(secret: str) -> None:
    """Called once by the platform at start-up, with the secret from its store."""
    _secret[:] = [secret.encode()]


@lru_cache(maxsize=8192)
def _token(secret: bytes, replica_id: str) -> str:
    return hmac.new(secret, replica_id.encode(), hashlib.sha256).hexdigest()


def token_for(replica_id: str) -> str | None:
    """The token of a replica, or None in a process without the platform's secret."""
    return _token(_secret[0], replica_id) if _secret else None


def headers_for(replica_id: str) -> dict[str, str]:
    """The header to send to that replica ({} without a secret: local replicas ignore it anyway)."""
    token = token_for(replica_id)
    return {HEADER: token} if token else {}


def take_token() -> str | None:
    """The replica's own token, removed from the environment so the model's code never sees it."""
    return os.environ.pop(ENV, None) or None


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_REFUSED = json.dumps({"error": {
    "message": "this replica answers only its platform: call it through the gateway with an API key",
    "type": "authentication_error", "param": None, "code": "replica_token_required"}}).encode()


class ReplicaAuth:
    """ASGI middleware of a replica that has a token: 401 for an HTTP request without it (probes excepted)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") not in OPEN_PATHS:
            sent = dict(scope.get("headers") or []).get(HEADER.encode(), b"")
            if not hmac.compare_digest(sent, self.token):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(_REFUSED)).encode())]})
                await send({"type": "http.response.body", "body": _REFUSED})
                return
        await self.app(scope, receive, send)
