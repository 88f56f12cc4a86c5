"""Scheduling priorities on the wire: the classes, and the header the platform sets on what it forwards.

Lower is more important. Interactive traffic is 0, an async request of priority p (0..2) runs at
1 + p, and batch lines at 4, so a replica's engine gives queued work only the slots, tokens and KV
blocks interactive traffic leaves. The engine takes these numbers from here; the gateway and the
replica share the header name and its parsing.
"""

from __future__ import annotations

from ballast.openai.errors import APIError

PRIORITY_INTERACTIVE = 0
PRIORITY_ASYNC = 1  # an async request's own priority 0..2 is added to this
PRIORITY_BATCH = 4
MAX_PRIORITY = PRIORITY_BATCH

PRIORITY_HEADER = "x-ballast-priority"


def async_priority(request_priority: int) -> int:
    """The engine priority of an async request of priority 0..2 (0 runs first)."""
    return PRIORITY_ASYNC + min(max(request_priority, 0), 2)


def parse_priority_header(value: str | None) -> int | None:
    """The header's priority, None when absent; a 400 when it is not an integer in 0..MAX_PRIORITY."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or not 0 <= int(text) <= MAX_PRIORITY:
        raise APIError(400, f"{PRIORITY_HEADER} must be an integer between 0 and {MAX_PRIORITY}",
                       code="invalid_request", param=PRIORITY_HEADER)
    return int(text)
