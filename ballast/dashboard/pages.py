"""The dashboard's pages (GET): server-rendered HTML, plus the small JSON and HTML fragments its script polls."""

from __future__ import annotations

import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ballast.control import ControlError
from ballast.control.metrics_history import RANGES
from ballast.dashboard import views
from ballast.dashboard.core import NAME, Dash, Refused
from ballast.dashboard.render import page


def _notes(request: Request) -> dict[str, str]:
    q = request.query_params
    return {"notice": q.get("notice", "")[:500], "error": q.get("error", "")[:500]}


async def home(dash: Dash, request: Request) -> Response:
    v = await run_in_threadpool(dash.sessions.viewer, request)
    if v is None:
        return page("login.html", error=request.query_params.get("error", "")[:200])
    rows = await run_in_threadpool(views.deployments, dash.control, v)
    return page("deployments.html", viewer=v, deployments=rows, **_notes(request))


async def deployments_fragment(dash: Dash, request: Request) -> Response:
    v = await dash.viewer(request)
    rows = await run_in_threadpool(views.deployments, dash.control, v)
    return page("deployments_rows.html", viewer=v, deployments=rows)


async def deployment(dash: Dash, request: Request) -> Response:
    v = await dash.viewer(request)
    name = dash.deployment(request, v)
    try:
        info = await run_in_threadpool(views.deployment, dash.control, name)
    except ControlError as e:
        raise Refused(page("message.html", e.status, viewer=v, title="Not found", message=e.message)) from None
    recent = await run_in_threadpool(views.events, dash.control, v, name, "", 20)
    return page("deployment.html", viewer=v, d=info, events=recent, ranges=list(RANGES), **_notes(request))


async def replicas_fragment(dash: Dash, request: Request) -> Response:
    v = await dash.viewer(request)
    name = dash.deployment(request, v)
    try:
        info = await run_in_threadpool(views.deployment, dash.control, name)
    except ControlError:
        return Response("", status_code=404)
    return page("replicas.html", viewer=v, d=info)


async def metrics(dash: Dash, request: Request) -> Response:
    v = await dash.viewer(request)
    name = dash.deployment(request, v)
    range_ = request.query_params.get("range", "1h")
    try:
        data = await run_in_threadpool(dash.history.query, name, range_, time.time())
    except ControlError as e:  # the OpenAI error shape the REST API uses (x-request-id is set by the middleware)
        kind = "invalid_request_error" if e.status == 400 else "not_found_error"
        return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}},
                            status_code=e.status)
    return JSONResponse(data, headers={"cache-control": "no-store"})


async def events(dash: Dash, request: Request) -> Response:
    v = await dash.viewer(request)
    q = request.query_params
    dep, kind = q.get("deployment", "")[:63], q.get("kind", "")[:64]
    if dep and not NAME.match(dep):
        dep = ""
    rows = await run_in_threadpool(views.events, dash.control, v, dep, kind)
    names = [d["name"] for d in await run_in_threadpool(dash.control.list_deployments) if v.may_see(d["name"])]
    return page("events.html", viewer=v, events=rows, deployment=dep, kind=kind, names=names)


def _log_query(request: Request) -> tuple[str, int]:
    q = request.query_params
    tail = q.get("tail", "200")
    return q.get("request_id", "").strip()[:128], min(int(tail), 5000) if tail.isdigit() else 200


async def logs(dash: Dash, request: Request) -> Response:
    v = await dash.viewer(request)
    name = dash.deployment(request, v)
    request_id, tail = _log_query(request)
    lines = await run_in_threadpool(views.logs, dash.control, name, request_id, tail)
    return page("logs.html", viewer=v, name=name, lines=lines, request_id=request_id, tail=tail)


async def log_lines(dash: Dash, request: Request) -> Response:
    v = await dash.viewer(request)
    name = dash.deployment(request, v)
    request_id, tail = _log_query(request)
    lines = await run_in_threadpool(views.logs, dash.control, name, request_id, tail)
    return JSONResponse({"lines": lines}, headers={"cache-control": "no-store"})


async def keys(dash: Dash, request: Request) -> Response:
    v = await dash.viewer(request)
    rows = await run_in_threadpool(dash.keys.list, True)
    if not v.admin:
        rows = [k for k in rows if k["id"] == v.key_id]
    return page("keys.html", viewer=v, keys=rows, created=None, **_notes(request))


async def usage(dash: Dash, request: Request) -> Response:
    v = await dash.viewer(request)
    days = request.query_params.get("days", "30")
    n = min(int(days), 366) if days.isdigit() and days != "0" else 30
    data = await run_in_threadpool(views.usage, dash.keys, v, n)
    return page("usage.html", viewer=v, **data)


async def static(dash: Dash, request: Request) -> Response:
    return dash.static.response(str(request.path_params.get("file", "")))

