"""What crosses every hop of a deployed chain, spelled once for the gateway and the steps.

A hop's body is an envelope (`{ENVELOPE: {request_id, deadline_s, trace_id}, "inputs": {...}}`); the trace id
also travels as W3C `traceparent` (so tracing that reads it joins the same trace) and `x-ballast-trace`.
"""

from __future__ import annotations

import re
import secrets

ENVELOPE = "__ballast_chain__"
TRACE_HEADER = "x-ballast-trace"
DEADLINE_HEADER = "x-ballast-deadline"  # seconds the whole chain may take, from the caller
IDEMPOTENT_HEADER = "x-ballast-idempotent"  # "true" on a call to a step that may run twice (the gateway may resend)
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


def new_trace_id() -> str:
    return secrets.token_hex(16)


def trace_id_of(headers: object) -> str | None:
    """The trace id a request carries (`traceparent`, else `x-ballast-trace`), or None."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    m = _TRACEPARENT.match(str(get("traceparent") or "").strip().lower())
    if m and m.group(1) != "0" * 32:
        return m.group(1)
    own = str(get(TRACE_HEADER) or "").strip().lower()
    return own if _TRACE_ID.match(own) else None


def trace_headers(trace_id: str) -> dict[str, str]:
    """Headers that carry `trace_id` to the next hop (a fresh span id in `traceparent`)."""
    if not _TRACE_ID.match(trace_id):
        return {}
    return {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01", TRACE_HEADER: trace_id}
