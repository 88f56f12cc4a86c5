"""API keys of the platform: random secrets shown once, stored as sha256 hashes."""

from __future__ import annotations

import os
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ballast.control.eval_store import INTERNAL_KEY_ID
from ballast.control.keys import new_secret
from ballast.gateway.auth import MISSING_KEY_MESSAGE, api_key_from_headers
from ballast.openai import APIError
from ballast.store import ApiKey, Setting, hash_key, utcnow


def bootstrap_admin(sessions: sessionmaker[Session]) -> str | None:
    """Create the first admin key if there is none; returns its secret (the only time it exists in clear)."""
    with sessions() as s:
        keys = s.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None))).all()
        if any("admin" in (k.scopes or []) and k.id != INTERNAL_KEY_ID for k in keys):
            return None
        secret = new_secret()
        try:
            s.add(ApiKey(id="key-" + os.urandom(6).hex(), name="admin", key_hash=hash_key(secret),
                         prefix=secret[:10], scopes=["admin"], created_at=utcnow(), budget_per="month"))
            s.commit()
        except IntegrityError:
            s.rollback()
            return None
        return secret


def setting(sessions: sessionmaker[Session], key: str, default: str) -> str:
    """Read a platform setting, storing `default` the first time (first writer wins)."""
    with sessions() as s:
        row = s.get(Setting, key)
        if row is not None:
            return row.value
        try:
            s.add(Setting(key=key, value=default))
            s.commit()
            return default
        except IntegrityError:
            s.rollback()
    with sessions() as s:
        row = s.get(Setting, key)
        assert row is not None
        return row.value


def lookup(sessions: sessionmaker[Session], secret: str) -> ApiKey | None:
    with sessions() as s:
        return s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret), ApiKey.revoked_at.is_(None)))


def request_secret(request: Request) -> str:
    """The API key a request carries (the gateway's one parser: `Authorization: Bearer`, `Api-Key`, `x-api-key`)."""
    return api_key_from_headers(request.headers) or ""


def actor(request: Request) -> str:
    """The caller of a REST API call, from its admin API key (401 without a valid key, 403 without admin)."""
    secret = request_secret(request)
    if not secret:
        raise APIError(401, MISSING_KEY_MESSAGE, code="missing_api_key")
    key = lookup(request.app.state.control.sessions, secret)
    if key is None:
        raise APIError(401, "invalid API key", code="invalid_api_key")
    if "admin" not in (key.scopes or []):
        raise APIError(403, "this key may not manage deployments (needs the admin scope)", code="insufficient_scope")
    return f"{key.name or 'key'}:{key.prefix}"


Actor = Annotated[str, Depends(actor)]
