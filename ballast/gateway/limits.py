"""Per-key limits held in memory: token buckets for requests/min and tokens/min, period budgets.

`LocalState` is the gateway's hook for them (and for prefix affinity); `gateway/shared.py` swaps in Redis."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ballast.control.keys import KeyRecord
from ballast.gateway.routing import Router
from ballast.openai import APIError
from ballast.store import period_start


@dataclass
class TokenBucket:
    """Refills continuously at `rate_per_min`; may go negative when actual usage is charged late."""

    rate_per_min: float
    level: float = field(default=-1.0)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.level < 0:
            self.level = self.rate_per_min

    def _refill(self, now: float) -> None:
        self.level = min(self.rate_per_min, self.level + (now - self.stamp) * self.rate_per_min / 60.0)
        self.stamp = now

    def try_take(self, amount: float = 1.0) -> float:
        """Take `amount` if available; otherwise return the seconds until it would be (0 = taken)."""
        now = time.monotonic()
        self._refill(now)
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) * 60.0 / self.rate_per_min

    def blocked_for(self) -> float:
        """Seconds until the level is positive again (0 if it is)."""
        now = time.monotonic()
        self._refill(now)
        return 0.0 if self.level > 0 else (1e-9 - self.level) * 60.0 / self.rate_per_min

    def charge(self, amount: float) -> None:
        self._refill(time.monotonic())
        self.level -= amount


def period_end(per: str, now: datetime | None = None) -> datetime:
    start = period_start(per, now)
    if per == "day":
        return datetime.fromtimestamp(start.timestamp() + 86400, UTC)
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return start.replace(year=year, month=month)


def too_many(message: str, retry_after: float, code: str) -> APIError:
    return APIError(429, message, code=code, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


class KeyLimiter:
    """The live limit state of one API key; its limits are those of the key's record."""

    def __init__(self, key: KeyRecord):
        self.key_id = key.id
        self.rpm, self.tpm, self.token_budget, self.budget_per = key.limits
        self.limits = key.limits
        self.used_in_period = key.used_in_period
        self.period = period_start(self.budget_per)
        self._rpm = TokenBucket(self.rpm) if self.rpm else None
        self._tpm = TokenBucket(self.tpm) if self.tpm else None

    def current_period(self) -> datetime:
        """The start of the budget period now (a new period starts with nothing used)."""
        start = period_start(self.budget_per)
        if start != self.period:
            self.period, self.used_in_period = start, 0
        return start

    def over_budget(self) -> APIError:
        wait = (period_end(self.budget_per) - datetime.now(UTC)).total_seconds()
        return too_many(f"this key has used its token budget of {self.token_budget} for this {self.budget_per}",
                        wait, "budget_exceeded")

    def over_tpm(self, wait: float) -> APIError:
        return too_many(f"rate limit of {self.tpm} tokens per minute reached", wait, "rate_limit_tokens")

    def over_rpm(self, wait: float) -> APIError:
        return too_many(f"rate limit of {self.rpm} requests per minute reached", wait, "rate_limit_requests")

    def admit(self) -> None:
        """Raise 429 if the key is over a limit; otherwise count the request."""
        if self.token_budget is not None:
            self.current_period()
            if self.used_in_period >= self.token_budget:
                raise self.over_budget()
        if self._tpm is not None:
            wait = self._tpm.blocked_for()
            if wait > 0:
                raise self.over_tpm(wait)
        if self._rpm is not None:
            wait = self._rpm.try_take(1)
            if wait > 0:
                raise self.over_rpm(wait)

    def note_admitted(self) -> None:
        """Another judge (the shared limits) admitted a request: count it here too, for when that judge is gone."""
        if self._rpm is not None:
            self._rpm.charge(1)

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm or self.token_budget is not None)

    def charge(self, tokens: int) -> None:
        if self._tpm is not None:
            self._tpm.charge(tokens)
        self.used_in_period += tokens


class LocalState:
    """Where the gateway keeps per-key limits and prefix affinity: in this process (the default, no I/O on the
    hot path). `gateway/shared.RedisState` shares them between gateways (`ballast up --redis-url`)."""

    async def admit(self, limiter: KeyLimiter | None, router: Router | None = None,
                    prefix: bytes | None = None) -> None:
        """Raise 429 if the key (None: not to be judged) is over a limit; otherwise count the request. With
        `prefix` (the request's affinity key), `router` also learns where other gateways sent it: nothing to learn
        in one process."""
        if limiter is not None:
            limiter.admit()

    def finished(self, limiter: KeyLimiter | None, deployment: str, version: int, tokens: int) -> None:
        """A request is over: charge its tokens to the key's token bucket and budget."""
        if limiter is not None:
            limiter.charge(tokens)
