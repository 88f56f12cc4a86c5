"""The dashboard's actions (POST forms): sign in and out, promote, canary, rollback, scale, create and revoke keys.
Each checks the session, the CSRF token, the origin and the admin scope first, then calls the same control-plane
operation as the REST API, and redirects back with the outcome."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ballast.control import ControlError
from ballast.dashboard.core import Dash, actor, back, to_int
from ballast.dashboard.render import page
from ballast.dashboard.session import COOKIE, MAX_AGE_S, same_origin


async def sign_in(dash: Dash, request: Request) -> Response:
    form = await request.form()
    secret = str(form.get("api_key", "")).strip()
    if not same_origin(request):
        return page("login.html", 403, error="This sign-in form came from another site.")
    cookie = await run_in_threadpool(dash.sessions.sign_in, secret) if secret else None
    if cookie is None:
        return page("login.html", 401, error="That API key is not valid (or was revoked).")
    out = RedirectResponse("/", status_code=303)
    out.set_cookie(COOKIE, cookie, max_age=MAX_AGE_S, httponly=True, samesite="strict", path="/",
                   secure=request.url.scheme == "https")
    return out


async def sign_out(dash: Dash, request: Request) -> Response:
    await dash.form(request, admin=False)
    out = RedirectResponse("/", status_code=303)
    out.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return out


async def _change(dash: Dash, request: Request, what: str) -> Response:
    v, data = await dash.form(request)
    name = dash.deployment(request, v)
    env = data.get("env", "production").strip() or "production"
    here = f"/ui/deployments/{name}"
    c = dash.control
    try:
        if what == "promote":
            version = to_int(data, "version")
            canary = to_int(data, "canary", required=False)
            assert version is not None
            out = await run_in_threadpool(lambda: c.promote(name, version, env, canary=canary or None, actor=actor(v)))
            message = f"v{version} → {env}: {out.get('state', 'done')}"
        elif what == "rollback":
            await run_in_threadpool(lambda: c.rollback(name, env, actor=actor(v)))
            message = f"rolled back {env}"
        else:
            lo, hi = to_int(data, "min", required=False), to_int(data, "max", required=False)
            await run_in_threadpool(lambda: c.scale(name, env, min_replicas=lo, max_replicas=hi, actor=actor(v)))
            message = f"scaled {env} to {lo if lo is not None else '-'}..{hi if hi is not None else '-'}"
    except ValueError as e:
        return back(here, str(e), error=True)
    except ControlError as e:
        return back(here, e.message, error=True)
    await run_in_threadpool(dash.changed, None)
    return back(here, message)


async def promote(dash: Dash, request: Request) -> Response:
    return await _change(dash, request, "promote")


async def rollback(dash: Dash, request: Request) -> Response:
    return await _change(dash, request, "rollback")


async def scale(dash: Dash, request: Request) -> Response:
    return await _change(dash, request, "scale")


async def create_key(dash: Dash, request: Request) -> Response:
    v, data = await dash.form(request)
    scopes = [s for s in ("inference", "metrics", "admin") if data.get(f"scope_{s}")]
    deployments = [d.strip() for d in data.get("deployments", "").split(",") if d.strip()] or None
    try:
        created = await run_in_threadpool(lambda: dash.keys.create(name=data.get("name", "")[:128], scopes=scopes,
                                                                   deployments=deployments))
    except ControlError as e:
        return back("/ui/keys", e.message, error=True)
    await dash.refreshed()
    rows = await run_in_threadpool(dash.keys.list, True)
    # The secret is in this one response only (never stored, never in a URL).
    return page("keys.html", 201, viewer=v, keys=rows, created=created, notice="", error="")


async def revoke_key(dash: Dash, request: Request) -> Response:
    _v, _data = await dash.form(request)
    key_id = str(request.path_params.get("key_id", ""))[:64]
    try:
        out = await run_in_threadpool(dash.keys.revoke, key_id)
    except ControlError as e:
        return back("/ui/keys", e.message, error=True)
    await dash.refreshed()
    return back("/ui/keys", f"revoked {out['name'] or out['prefix']}")
