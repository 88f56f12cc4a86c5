"""The request id and the deadline that travel with every call of a chain (context variables).

Context variables follow `await` and are copied into tasks made by `asyncio.gather`, so fan-out calls
inherit the caller's request id and deadline without the user passing them along.
"""

from __future__ import annotations

import asyncio
import uuid
from contextvars import ContextVar

request_id_var: ContextVar[str] = ContextVar("ballast_chain_request_id", default="")
deadline_var: ContextVar[float | None] = ContextVar("ballast_chain_deadline", default=None)
trace_id_var: ContextVar[str] = ContextVar("ballast_chain_trace_id", default="")  # one id for every hop


def current_request_id() -> str:
    """The request id of the chain call in progress (made up when none is set)."""
    rid = request_id_var.get()
    if not rid:
        rid = uuid.uuid4().hex
        request_id_var.set(rid)
    return rid


def remaining_s() -> float | None:
    """Seconds left before the caller's deadline, or None without one."""
    deadline = deadline_var.get()
    if deadline is None:
        return None
    return deadline - asyncio.get_running_loop().time()


def budget_s(timeout_s: float | None) -> float | None:
    """What one hop may spend: the smaller of its own timeout and what is left of the caller's deadline."""
    left = remaining_s()
    if left is None:
        return timeout_s
    return left if timeout_s is None else min(left, timeout_s)
