"""Observability shared by every Ballast server: request ids, structured logs, Prometheus metrics."""

from ballast.observe.logging import (
    REQUEST_ID_HEADER,
    configure_logging,
    current_request_id,
    new_request_id,
    request_id_var,
)

__all__ = [
    "REQUEST_ID_HEADER",
    "configure_logging",
    "current_request_id",
    "new_request_id",
    "request_id_var",
]
