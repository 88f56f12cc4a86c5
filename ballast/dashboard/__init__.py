"""The web dashboard `ballast up` serves at `/`: deployments and their health, a deployment's versions,
environments, replicas, actions and charts of its metrics history, the audit log, logs, keys and usage.

Server-rendered HTML (Jinja2) and one small script; the charting library (uPlot) is vendored in `static/` with its
licence, so nothing is built at install time and pages need no other host.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ballast.control import ControlPlane
from ballast.control.metrics_history import MetricsHistory
from ballast.dashboard import actions, pages
from ballast.dashboard.core import Dash, Refused

Handler = Callable[[Dash, Request], Awaitable[Response]]

ROUTES: list[tuple[str, Handler, str]] = [
    ("/", pages.home, "GET"),
    ("/ui/login", actions.sign_in, "POST"),
    ("/ui/logout", actions.sign_out, "POST"),
    ("/ui/static/{file}", pages.static, "GET"),
    ("/ui/fragments/deployments", pages.deployments_fragment, "GET"),
    ("/ui/deployments/{name}", pages.deployment, "GET"),
    ("/ui/deployments/{name}/replicas", pages.replicas_fragment, "GET"),
    ("/ui/deployments/{name}/metrics", pages.metrics, "GET"),
    ("/ui/deployments/{name}/logs", pages.logs, "GET"),
    ("/ui/deployments/{name}/logs/lines", pages.log_lines, "GET"),
    ("/ui/deployments/{name}/promote", actions.promote, "POST"),
    ("/ui/deployments/{name}/rollback", actions.rollback, "POST"),
    ("/ui/deployments/{name}/scale", actions.scale, "POST"),
    ("/ui/events", pages.events, "GET"),
    ("/ui/keys", pages.keys, "GET"),
    ("/ui/keys", actions.create_key, "POST"),
    ("/ui/keys/{key_id}/revoke", actions.revoke_key, "POST"),
    ("/ui/usage", pages.usage, "GET"),
]


def routes(control: ControlPlane, history: MetricsHistory, changed: Callable[[Any], Any],
           refreshed: Callable[[], Awaitable[None]]) -> list[BaseRoute]:
    """The dashboard's routes, to add to the platform app (outside the OpenAPI document: they are pages)."""
    dash = Dash(control, history, changed, refreshed)

    def bind(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(dash, request)
            except Refused as r:
                return r.response

        return endpoint

    return [Route(path, bind(h), methods=[method]) for path, h, method in ROUTES]
