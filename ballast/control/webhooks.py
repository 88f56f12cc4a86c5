"""Webhooks for async requests: target checks (SSRF), Standard Webhooks signatures, delivery with backoff.

The signing secret (`whsec_...`) must be kept in clear to sign, so it lives in the store's settings
table (the SQLite file is 0600; on PostgreSQL it is as private as the database). It is shown once,
when `POST /api/v1/webhook_secret` creates or rotates it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import os
import socket
import time
from collections.abc import Iterable
from datetime import timedelta
from urllib.parse import urlsplit

import aiohttp
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ballast.control.async_queue import AsyncQueue, Delivery
from ballast.control.errors import ControlError
from ballast.store import Setting, utcnow

SECRET_SETTING = "webhook_secret"
ALLOW_ENV = "BALLAST_WEBHOOK_ALLOW"
METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
BACKOFF_S = (1.0, 2.0, 5.0, 15.0, 60.0)  # then WEBHOOK_FAILED
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow(values: Iterable[str]) -> list[IPNet]:
    """CIDRs (`127.0.0.1/32`, `10.0.0.0/8`) that webhooks may target although private or loopback."""
    nets = []
    for v in values:
        for part in v.split(","):
            if part.strip():
                try:
                    nets.append(ipaddress.ip_network(part.strip(), strict=False))
                except ValueError:
                    raise ValueError(f"webhook allow-list: `{part.strip()}` is not a CIDR (as in 127.0.0.1/32)") \
                        from None
    return nets


def allow_from_env() -> list[IPNet]:
    return parse_allow([os.environ.get(ALLOW_ENV, "")])


def _refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if ip in METADATA:
        return "a cloud metadata address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_private or ip.is_reserved or ip.is_multicast or ip.is_unspecified:
        return "a private or reserved address"
    return None


def literal_host(url: str) -> bool:
    """Whether the URL names its host by IP address (so `check_target` needs no DNS and may run on the loop)."""
    try:
        host = urlsplit(url).hostname
        ipaddress.ip_address(host or "")
    except ValueError:
        return False
    return True


def check_target(url: str, allow: list[IPNet]) -> None:
    """Refuse (400, naming the reason) a webhook URL that is not http(s) or resolves to an address outside the
    public internet, unless allow-listed. Blocking (DNS): call it off the event loop."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ControlError(400, f"webhook_endpoint is not a valid URL: {e}", "invalid_webhook", "webhook_endpoint") \
            from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ControlError(400, "webhook_endpoint must be an http:// or https:// URL with a host",
                           "invalid_webhook", "webhook_endpoint")
    try:
        infos = socket.getaddrinfo(parts.hostname, port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except OSError:
        raise ControlError(400, f"webhook_endpoint host `{parts.hostname}` does not resolve", "invalid_webhook",
                           "webhook_endpoint") from None
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if any(ip in net for net in allow):
            continue
        reason = _refusal(ip)
        if reason:
            raise ControlError(400, f"webhook_endpoint `{parts.hostname}` resolves to {ip}, {reason}; allow it with "
                               f"`ballast up --webhook-allow CIDR` or {ALLOW_ENV}", "webhook_target_blocked",
                               "webhook_endpoint")


# ---- the signing secret ----------------------------------------------------------------------
def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


class WebhookSecrets:
    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions
        self._cached: tuple[float, str | None] = (0.0, None)

    def rotate(self) -> str:
        """A new secret (returned once); deliveries from now on are signed with it."""
        secret = new_secret()
        with self.sessions() as s:
            row = s.get(Setting, SECRET_SETTING)
            if row is None:
                s.add(Setting(key=SECRET_SETTING, value=secret))
            else:
                row.value = secret
            s.commit()
        self._cached = (time.monotonic(), secret)
        return secret

    def current(self) -> str | None:
        at, value = self._cached
        if value is None or time.monotonic() - at > 5.0:
            with self.sessions() as s:
                value = s.scalar(select(Setting.value).where(Setting.key == SECRET_SETTING))
            self._cached = (time.monotonic(), value)
        return value


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`webhook-signature` per Standard Webhooks: v1,base64(HMAC-SHA256(key, "id.timestamp.body"))."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


# ---- delivery --------------------------------------------------------------------------------
class WebhookSender:
    """Delivers due webhooks from the queue: 2xx delivers; 5xx, 408, 429 and network errors retry with
    backoff; other 4xx (the receiver refuses it) and running out of attempts give WEBHOOK_FAILED."""

    def __init__(self, queue: AsyncQueue, secrets: WebhookSecrets, allow: list[IPNet], timeout_s: float = 10.0):
        self.queue = queue
        self.secrets = secrets
        self.allow = allow
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._busy: set[str] = set()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def run_due(self) -> int:
        due = [d for d in await asyncio.to_thread(self.queue.due_deliveries) if d.id not in self._busy]
        if due:
            self._busy.update(d.id for d in due)
            try:
                await asyncio.gather(*(self._deliver(d) for d in due))
            finally:
                self._busy.difference_update(d.id for d in due)
        return len(due)

    async def _deliver(self, d: Delivery) -> None:
        error = await self._attempt(d)
        if error is None:
            await asyncio.to_thread(self.queue.delivered, d.id)
            return
        final = error.startswith("refused") or d.attempts >= len(BACKOFF_S)
        retry_at = None if final else utcnow() + timedelta(seconds=BACKOFF_S[d.attempts])
        await asyncio.to_thread(self.queue.delivery_failed, d.id, error, retry_at)

    async def _attempt(self, d: Delivery) -> str | None:
        """None when delivered, else why not (`refused...` when retrying cannot help)."""
        secret = await asyncio.to_thread(self.secrets.current)
        if secret is None:  # no one asked for the secret yet: create it (POST /api/v1/webhook_secret rotates it)
            secret = await asyncio.to_thread(self.secrets.rotate)
        try:
            await asyncio.to_thread(check_target, d.endpoint, self.allow)  # again: DNS may have changed
        except ControlError as e:
            return f"refused: {e.message}"
        body = json.dumps(d.body, separators=(",", ":")).encode()
        ts = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": d.webhook_id, "webhook-timestamp": str(ts),
                   "webhook-signature": sign(secret, d.webhook_id, ts, body), "user-agent": "ballast-webhooks/1"}
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        try:
            async with self._session.post(d.endpoint, data=body, headers=headers, allow_redirects=False) as resp:
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as e:
            return f"{type(e).__name__} posting to the webhook"
        if 200 <= status < 300:
            return None
        if status >= 500 or status in (408, 429):
            return f"the webhook answered {status}"
        return f"refused: the webhook answered {status}"

