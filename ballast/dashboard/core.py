"""What every dashboard handler shares: the control plane, the metrics history, the signed-in viewer, and the
checks on a posted form (session, CSRF token, same origin, admin scope)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ballast.control import ControlPlane
from ballast.control.keys import KeyStore
from ballast.control.metrics_history import MetricsHistory
from ballast.dashboard.render import Static, page
from ballast.dashboard.session import Sessions, Viewer, csrf_ok

NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class Refused(Exception):
    """A request the dashboard answers with a page rather than an action."""

    def __init__(self, response: Response):
        self.response = response


@dataclass
class Dash:
    control: ControlPlane
    history: MetricsHistory
    changed: Callable[[Any], Any]  # desired state changed (worker thread): reconcile and route by it now
    refreshed: Callable[[], Awaitable[None]]  # keys changed: the gateway re-reads them now
    sessions: Sessions = field(init=False)
    keys: KeyStore = field(init=False)
    static: Static = field(init=False)

    def __post_init__(self) -> None:
        self.sessions = Sessions(self.control.sessions, self.control.home)
        self.keys = KeyStore(self.control.sessions)
        self.static = Static()

    async def viewer(self, request: Request) -> Viewer:
        """The signed-in viewer, or a redirect to the sign-in page."""
        v = await run_in_threadpool(self.sessions.viewer, request)
        if v is None:
            raise Refused(RedirectResponse("/", status_code=303))
        return v

    async def form(self, request: Request, *, admin: bool = True) -> tuple[Viewer, dict[str, str]]:
        """A posted form from a signed-in viewer of this origin with a valid CSRF token (and the admin scope)."""
        v = await self.viewer(request)
        data = {k: str(val) for k, val in (await request.form()).items()}
        if not csrf_ok(request, v, data.get("csrf", "")):
            raise Refused(page("message.html", 403, viewer=v, title="Refused",
                               message="This form came from another page or an old session; reload and retry."))
        if admin and not v.admin:
            raise Refused(page("message.html", 403, viewer=v, title="Read-only",
                               message="This key is read-only here: actions need a key with the admin scope."))
        return v, data

    def deployment(self, request: Request, viewer: Viewer) -> str:
        name = str(request.path_params.get("name", ""))
        if not NAME.match(name) or not viewer.may_see(name):
            raise Refused(page("message.html", 404, viewer=viewer, title="Not found",
                               message=f"No deployment named {name!r}."))
        return name


def back(path: str, message: str = "", error: bool = False) -> RedirectResponse:
    """Post/redirect/get, with the outcome shown once on the page it lands on."""
    if message:
        path += ("&" if "?" in path else "?") + ("error=" if error else "notice=") + quote(message)
    return RedirectResponse(path, status_code=303)


def actor(v: Viewer) -> str:
    return f"{v.name}:{v.prefix} (dashboard)"


def to_int(data: dict[str, str], name: str, required: bool = True) -> int | None:
    raw = data.get(name, "").strip()
    if not raw and not required:
        return None
    if not raw.isdigit() or len(raw) > 9:
        raise ValueError(f"{name} must be a whole number")
    return int(raw)
