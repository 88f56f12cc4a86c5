"""Per-key limits, in memory: token buckets, the key limiter (rpm, tpm, period budgets) and period ends.

Real objects throughout; time passing is simulated by moving a bucket's `stamp` back.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ballast.control.keys import KeyRecord
from ballast.gateway.limits import KeyLimiter, TokenBucket, period_end
from ballast.openai import APIError
from ballast.store import period_start


def _key(**limits: Any) -> KeyRecord:
    return KeyRecord("k1", "h1", frozenset({"inference"}), **limits)


def _refused(limiter: KeyLimiter) -> APIError:
    with pytest.raises(APIError) as e:
        limiter.admit()
    assert e.value.status == 429
    return e.value


# ---- TokenBucket --------------------------------------------------------------------------------
def test_bucket_starts_full_then_says_how_long_to_wait():
    b = TokenBucket(60)  # one per second
    assert all(b.try_take() == 0 for _ in range(60))
    wait = b.try_take()
    assert 0.9 < wait <= 1.0


def test_bucket_refills_with_time_up_to_its_rate():
    b = TokenBucket(60)
    b.try_take(60)
    b.stamp -= 30  # half a minute passes
    assert b.try_take(30) == 0
    assert b.try_take(1) > 0
    b.stamp -= 3600  # an hour passes: still one minute's worth at most
    assert b.try_take(60) == 0
    assert b.try_take(1) > 0


def test_bucket_charged_late_goes_negative_and_blocks_until_positive():
    b = TokenBucket(60)
    assert b.blocked_for() == 0
    b.charge(90)  # 30 over
    assert 29 < b.blocked_for() <= 30.001
    b.stamp -= 31
    assert b.blocked_for() == 0


# ---- KeyLimiter ---------------------------------------------------------------------------------
def test_key_without_limits_is_always_admitted_and_counts_its_tokens():
    lim = KeyLimiter(_key())
    for _ in range(1000):
        lim.admit()
    lim.charge(7)
    lim.charge(5)
    assert lim.used_in_period == 12


def test_requests_per_minute():
    lim = KeyLimiter(_key(rpm=2))
    lim.admit()
    lim.admit()
    e = _refused(lim)
    assert e.code == "rate_limit_requests"
    assert 1 <= int(e.headers["Retry-After"]) <= 30


def test_tokens_per_minute_are_charged_after_the_request():
    lim = KeyLimiter(_key(tpm=100))
    lim.admit()  # the tokens are not known yet: admitted
    lim.charge(150)
    e = _refused(lim)
    assert e.code == "rate_limit_tokens"
    assert 29 <= int(e.headers["Retry-After"]) <= 31  # 50 tokens over at 100 a minute


def test_token_budget_includes_what_the_key_used_before():
    lim = KeyLimiter(_key(token_budget=100, budget_per="day", used_in_period=60))
    lim.admit()
    lim.charge(40)
    e = _refused(lim)
    assert e.code == "budget_exceeded"
    assert 1 <= int(e.headers["Retry-After"]) <= 86400


def test_token_budget_starts_again_in_a_new_period():
    lim = KeyLimiter(_key(token_budget=100, budget_per="day", used_in_period=100))
    _refused(lim)
    lim.period = period_start("day", datetime.now(UTC) - timedelta(days=1))  # the day has turned since
    lim.admit()
    assert lim.used_in_period == 0


# ---- period_end ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("per", "now", "end"), [
    ("day", datetime(2026, 12, 2, 13, 5, tzinfo=UTC), datetime(2026, 12, 3, tzinfo=UTC)),
    ("day", datetime(2026, 12, 31, 23, 59, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
    ("month", datetime(2026, 1, 31, 12, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)),
    ("month", datetime(2026, 12, 2, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
])
def test_period_end_is_the_next_period_start(per, now, end):
    assert period_end(per, now) == end
    assert period_start(per, end) == end
