"""Usage metering off the request path: counters aggregated in memory, written in batches.

Rows are keyed by (key id, deployment, version, hour). Nothing about a request's content is kept:
only counts. `flush()` hands the pending batch to a sink (the store), and runs on an interval and on
shutdown, so a clean restart loses nothing; a failed write puts the batch back for the next try.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("ballast.gateway.metering")

UsageKey = tuple[str, str, int, datetime]


@dataclass
class UsageCounts:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    errors: int = 0

    def add(self, other: UsageCounts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def hour_of(now: datetime | None = None) -> datetime:
    return (now or datetime.now(UTC)).replace(minute=0, second=0, microsecond=0)


def counts_from_usage(usage: dict[str, Any] | None, error: bool) -> UsageCounts:
    u = usage or {}
    details = u.get("prompt_tokens_details") or u.get("input_tokens_details") or {}  # chat / Responses API
    return UsageCounts(
        requests=1,
        prompt_tokens=int(u.get("prompt_tokens") or u.get("input_tokens") or 0),
        completion_tokens=int(u.get("completion_tokens") or u.get("output_tokens") or 0),
        cached_tokens=int(details.get("cached_tokens") or 0),
        errors=1 if error else 0,
    )


class Meter:
    def __init__(self, sink: Callable[[dict[UsageKey, UsageCounts]], Awaitable[None]], interval_s: float = 1.0):
        self._pending: dict[UsageKey, UsageCounts] = {}
        self._sink = sink
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def record(self, key_id: str, deployment: str, version: int, counts: UsageCounts) -> None:
        k = (key_id, deployment, version, hour_of())
        row = self._pending.get(k)
        if row is None:
            self._pending[k] = counts
        else:
            row.add(counts)

    async def flush(self) -> None:
        async with self._lock:
            if not self._pending:
                return
            batch, self._pending = self._pending, {}
            try:
                await self._sink(batch)
            except Exception:
                log.exception("writing %d usage rows failed; keeping them for the next flush", len(batch))
                for k, v in batch.items():
                    row = self._pending.get(k)
                    if row is None:
                        self._pending[k] = v
                    else:
                        row.add(v)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.flush()
