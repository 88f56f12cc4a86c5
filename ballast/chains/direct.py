"""Calls between steps go straight to a ready replica of the step, not through the gateway.

Measured (README, bench/chains.py): a hop through the gateway costs a whole second HTTP exchange (the gateway's
auth, routing and relay) on top of the step's replica, which was most of the per-hop overhead. Metering, limits
and keys stay on the chain's entry (`/chains/NAME/run`); inside a chain the gateway only says which replicas of
a step version are ready (`GET /chains/NAME/steps/DEPLOYMENT/versions/N/replicas`, asked with the chain's
internal key). The list is refreshed in the background every second. A call goes to the replica with the fewest
calls from this process in flight (ties in turn). With no fresh list, or for two seconds after a direct call
failed, calls go through the gateway, which holds them while a replica starts and routes around dead ones.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:
    from ballast.chains.remote import ChainKey, Client

TTL_S = 1.0  # refresh the list this often (in the background)
STALE_S = 5.0  # a list older than this is not used
SUSPEND_S = 2.0  # after a failed direct call, go through the gateway this long


class Replicas:
    """The ready replicas of one step version, as last heard from the gateway."""

    def __init__(self, url: str, key: ChainKey, client: Client) -> None:
        self.url = url
        self.key = key
        self.client = client
        self.urls: list[str] = []
        self.tokens: dict[str, str] = {}  # url -> the replica's token, where it has one (a Ray replica)
        self.fetched = -STALE_S  # when the list was last received
        self.asked = -TTL_S  # when it was last asked for
        self.inflight: dict[str, int] = {}
        self.suspended_until = 0.0
        self._turn = 0
        self._refreshing: asyncio.Task[None] | None = None

    def pick(self) -> str | None:
        """A replica's base URL to call directly, or None to go through the gateway."""
        now = time.monotonic()
        if now - self.asked > TTL_S and self._refreshing is None:
            self.asked = now
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        if not self.urls or now < self.suspended_until or now - self.fetched > STALE_S:
            return None
        start = self._turn % len(self.urls)
        self._turn += 1
        order = self.urls[start:] + self.urls[:start]
        return min(order, key=lambda u: self.inflight.get(u, 0))

    def failed(self) -> None:
        """A direct call failed: use the gateway for a while, and a fresh list after that."""
        self.suspended_until = time.monotonic() + SUSPEND_S
        self.urls = []

    async def _refresh(self) -> None:
        try:
            headers = {"Authorization": f"Bearer {self.key.value}"}
            async with self.client.session().get(self.url, headers=headers) as r:
                body = await r.json() if r.status == 200 else None
            urls = body.get("replicas") if isinstance(body, dict) else None
            if isinstance(urls, list) and all(isinstance(u, str) for u in urls):
                self.urls = [u.rstrip("/") for u in urls]
                tokens = body.get("tokens") if isinstance(body, dict) else None
                tokens = tokens if isinstance(tokens, list) and len(tokens) == len(urls) else []
                self.tokens = {u: t for u, t in zip(self.urls, tokens, strict=False) if isinstance(t, str) and t}
                self.fetched = time.monotonic()
        except (TimeoutError, aiohttp.ClientError, ValueError):
            pass
        finally:
            self._refreshing = None
