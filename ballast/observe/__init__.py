"""Observability shared by every Ballast server: request ids, structured logs, HTTP helpers."""

from ballast.observe.http import HOP_BY_HOP, free_port, is_loopback
from ballast.observe.logging import (
    REQUEST_ID_HEADER,
    configure_logging,
    current_request_id,
    new_request_id,
    request_id_var,
)
from ballast.observe.requests import RequestIdMiddleware, incoming_request_id

__all__ = [
    "HOP_BY_HOP",
    "REQUEST_ID_HEADER",
    "RequestIdMiddleware",
    "configure_logging",
    "current_request_id",
    "free_port",
    "incoming_request_id",
    "is_loopback",
    "new_request_id",
    "request_id_var",
]
