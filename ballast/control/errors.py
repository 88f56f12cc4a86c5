"""Errors of control-plane operations, carrying the HTTP status the REST API answers with."""

from __future__ import annotations

import re

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class ControlError(Exception):
    """An operation that cannot be done; `status` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


def check_name(name: str, what: str = "deployment name", param: str = "name") -> str:
    if not NAME_RE.match(name or ""):
        raise ControlError(400, f"invalid {what} {name!r}: use lowercase letters, digits and dashes (max 63)",
                           "invalid_name", param)
    return name
