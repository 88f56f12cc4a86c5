"""Stored times are UTC; SQLite hands them back naive, so everything reads them through `aware`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


@overload
def aware(dt: datetime) -> datetime: ...
@overload
def aware(dt: None) -> None: ...
@overload
def aware(dt: datetime | None) -> datetime | None: ...
def aware(dt: datetime | None) -> datetime | None:
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt


def iso(dt: datetime | None) -> str | None:
    dt = aware(dt)
    return dt.isoformat().replace("+00:00", "Z") if dt else None
