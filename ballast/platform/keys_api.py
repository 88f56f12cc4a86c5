"""REST routes for API keys and usage."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from ballast.control.keys import KeyStore
from ballast.openai import APIError
from ballast.platform.auth import Actor
from ballast.platform.openapi import CheckedJSONRoute, errors
from ballast.platform.schemas import KeyRequest

# A date or a date-time, seconds and offset optional (UTC without one), written so that every string the pattern
# admits is a real calendar time: the document then promises exactly what the server parses.
_DAY = r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)|02-(?:0[1-9]|1\d|2[0-8]))"
_TIME = r"(?:[Tt ](?:[01]\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:\.\d{1,6})?)?(?:[Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)?)?"
SINCE = rf"^(?:[1-9]\d{{3}}|0[1-9]\d\d|00[1-9]\d|000[1-9])-{_DAY}{_TIME}$"
_SINCE = re.compile(SINCE)


def _date_time(value: str | None) -> datetime | None:
    """Parse `since`; pydantic's datetime would also take numbers, which the document does not promise."""
    if value is None:
        return None
    try:
        if not _SINCE.match(value):
            raise ValueError(value)
        dt = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        raise APIError(400, f"since: {value!r} is not a date or date-time (2026-11-01, 2026-11-01T12:00Z)",
                       code="invalid_request", param="since") from None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def router(keys: KeyStore, refreshed: Callable[[], Awaitable[None]]) -> APIRouter:
    """`refreshed` makes a key change effective in this process's gateway before the call returns."""
    api = APIRouter(prefix="/api/v1", route_class=CheckedJSONRoute, tags=["keys"])

    @api.post("/keys", status_code=201)
    async def create_key(body: KeyRequest, _who: Actor) -> dict[str, Any]:
        """A new API key. The response's `key` is the secret, shown this once; only its hash is stored."""
        out = await run_in_threadpool(
            lambda: keys.create(name=body.name, scopes=list(body.scopes), deployments=body.deployments,
                                rpm=body.rpm, tpm=body.tpm, token_budget=body.token_budget, budget_per=body.per))
        await refreshed()
        return out

    @api.get("/keys")
    def list_keys(_who: Actor, include_revoked: bool = False) -> dict[str, Any]:
        return {"data": keys.list(include_revoked)}

    @api.delete("/keys/{key_id}", responses=errors(404, 409))
    async def revoke_key(key_id: str, _who: Actor) -> dict[str, Any]:
        """Revoke by id or shown prefix; the gateway refuses the key within a second (at once in this process).
        Revoking the last admin key is a 409."""
        out = await run_in_threadpool(keys.revoke, key_id)
        await refreshed()
        return out

    @api.get("/usage", responses=errors(404))
    def usage(_who: Actor, key: str | None = None, deployment: Annotated[str | None, Query(max_length=63)] = None,
              since: Annotated[str | None, Query(pattern=SINCE, description="A date or date-time (UTC without "
                                                                             "an offset).")] = None,
              group: Literal["hour", "key", "deployment"] = "hour") -> dict[str, Any]:
        """Requests, prompt/completion/cached tokens and errors per key, deployment, version and hour
        (`group=key` or `group=deployment` sums them). Usage the gateway has not flushed yet (at most a
        second's worth) is not included. An unknown `key` is a 404."""
        return {"data": keys.usage(key=key, deployment=deployment, since=_date_time(since), group=group)}

    return api
