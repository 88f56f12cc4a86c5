"""Templates (Jinja2, autoescaped) and the vendored static files, read once from the package: nothing is built at
install time, nothing is fetched from another host, and no client-named path is ever opened."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.responses import HTMLResponse, Response

HERE = Path(__file__).parent
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".txt": "text/plain; charset=utf-8"}
# Pages allow only this server's scripts, styles and fetches.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "x-content-type-options": "nosniff", "referrer-policy": "same-origin", "cache-control": "no-store",
}


def _ago(iso: str | None) -> str:
    if not iso:
        return ""
    seconds = time.time() - datetime.fromisoformat(iso).timestamp()
    return _duration(seconds) + " ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h {s % 3600 // 60}m" if s < 172_800 else f"{s // 86400}d"


ENV = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                  trim_blocks=True, lstrip_blocks=True)
ENV.filters["ago"] = _ago
ENV.filters["duration"] = _duration


def page(template: str, status: int = 200, /, **context: Any) -> HTMLResponse:
    return HTMLResponse(ENV.get_template(template).render(**context), status_code=status, headers=SECURITY_HEADERS)


class Static:
    """The files of `static/`, in memory, served by name from this fixed table."""

    def __init__(self) -> None:
        self.files = {p.name: (p.read_bytes(), _TYPES.get(p.suffix, "application/octet-stream"))
                      for p in (HERE / "static").iterdir() if p.is_file()}

    def response(self, name: str) -> Response:
        found = self.files.get(name)
        if found is None:
            return Response("not found", status_code=404, media_type="text/plain")
        body, media = found
        return Response(body, media_type=media, headers={"cache-control": "public, max-age=3600",
                                                        "x-content-type-options": "nosniff"})
