"""Dashboard sign-in: an API key exchanged for a signed session cookie, and the CSRF token of each session.

The cookie holds `key id.issued.signature` (HMAC-SHA256 with a secret kept 0600 in `$BALLAST_HOME`), is HttpOnly and
SameSite=Strict, and names the key rather than carrying it: every request re-reads the key, so revoking it ends its
sessions at once. The CSRF token is an HMAC of the cookie, sent back in each form; a form posted from another origin
fails both the token and the Origin check.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker
from starlette.requests import Request

from ballast.store import ApiKey, hash_key

COOKIE = "ballast_session"
MAX_AGE_S = 12 * 3600
SECRET_FILE = "dashboard.secret"


def load_secret(home: Path) -> bytes:
    """The signing secret, made once (0600, never overwritten: a second process reads the first one's)."""
    path = home / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    secret = os.urandom(32)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex())
    return secret


@dataclass(frozen=True)
class Viewer:
    """Who is looking: the signed-in key, what it may do and which deployments it may see."""

    key_id: str
    name: str
    prefix: str
    admin: bool
    deployments: frozenset[str] | None  # None: every deployment
    csrf: str

    def may_see(self, deployment: str) -> bool:
        return self.admin or self.deployments is None or deployment in self.deployments


class Sessions:
    def __init__(self, db: sessionmaker[DbSession], home: Path):
        self.db = db
        self.secret = load_secret(home)

    def _sign(self, payload: str) -> str:
        return hmac.new(self.secret, payload.encode(), hashlib.sha256).hexdigest()

    def sign_in(self, api_key: str) -> str | None:
        """A cookie value for a live key, or None."""
        with self.db() as s:
            key = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(api_key), ApiKey.revoked_at.is_(None)))
        if key is None:
            return None
        payload = f"{key.id}.{int(time.time())}"
        return f"{payload}.{self._sign(payload)}"

    def viewer(self, request: Request) -> Viewer | None:
        """The signed-in viewer of a request: a valid, unexpired signature over a key that is still live."""
        cookie = request.cookies.get(COOKIE, "")
        payload, _, sig = cookie.rpartition(".")
        key_id, _, issued = payload.partition(".")
        if not sig or not hmac.compare_digest(sig, self._sign(payload)) or not issued.isdigit():
            return None
        if time.time() - int(issued) > MAX_AGE_S:
            return None
        with self.db() as s:
            key = s.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)))
        if key is None:
            return None
        scopes = set(key.scopes or [])
        return Viewer(key.id, key.name or "key", key.prefix, "admin" in scopes,
                      frozenset(key.deployments) if key.deployments is not None else None,
                      self._sign("csrf." + cookie)[:32])


def same_origin(request: Request) -> bool:
    """A browser's Origin (or Referer) header, when sent, names this server."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return True
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1].split("/", 1)[0] == host and origin != "null"


def csrf_ok(request: Request, viewer: Viewer, token: str) -> bool:
    return same_origin(request) and hmac.compare_digest(token.encode(), viewer.csrf.encode())
