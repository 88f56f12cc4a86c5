"""The audit log: every change the control plane makes is an event row and one human log line.

The row is what `ballast events` shows; the line goes to the `ballast.events` logger at INFO, which
`ballast up` prints on the terminal, so an operator watches deploys, replicas and promotions live.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from ballast.store import Event, utcnow

events_log = logging.getLogger("ballast.events")


@dataclass
class EventSpec:
    """An event decided by pure code (the planner, the health state machine) and written later."""

    deployment: str
    kind: str
    message: str
    actor: str = "system"
    data: dict[str, Any] = field(default_factory=dict)


def event_line(ts: datetime, deployment: str, message: str, version: Any = None) -> str:
    """`12:03:04 chat v3 replica r-2 ready (...)`: the one concise line logged per event."""
    where = f"{deployment} v{version}" if version is not None else deployment
    return f"{ts:%H:%M:%S} {where} {message}"


def add_event(s: Session, deployment: str, kind: str, message: str, actor: str = "system", **data: Any) -> Event:
    """Record an event in the session's transaction and log its line."""
    ts = utcnow()
    row = Event(deployment=deployment, kind=kind, message=message, actor=actor or "system", data=data, ts=ts)
    s.add(row)
    if events_log.isEnabledFor(logging.INFO):
        events_log.info("%s", event_line(ts, deployment, message, data.get("version")))
    return row


def record(s: Session, events: list[EventSpec]) -> None:
    for e in events:
        add_event(s, e.deployment, e.kind, e.message, e.actor, **e.data)
