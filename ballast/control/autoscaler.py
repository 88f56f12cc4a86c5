"""The autoscaler: desired replicas of each version from the load the gateway publishes.

desired = ceil(average in-flight requests over `window_s` / (`concurrency_target` x `target_utilization`)),
clamped to [min, max]. Up at once (a burst is served as soon as replicas can start); down only after the
lower figure has held for `scale_down_delay_s`, so a lull between bursts does not churn replicas.
With `min_replicas: 0` an idle version goes to zero, and a request held by the gateway for a version with
no replica counts as in-flight load, which brings the first replica back.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ballast.config import AutoscalingConfig


class LoadSignal(Protocol):
    """Where load comes from (the gateway implements it): in-flight requests per (deployment, version),
    requests held for a version with no ready replica included."""

    def load(self) -> dict[tuple[str, int], float]: ...


@dataclass
class _Series:
    samples: deque[tuple[float, float]] = field(default_factory=deque)  # (monotonic time, in-flight)
    below_since: float | None = None  # when the wanted count first fell below the current one


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    concurrency_target: float = 1.0
    target_utilization: float = 0.8
    window_s: float = 60.0
    scale_down_delay_s: float = 300.0

    @classmethod
    def from_config(cls, a: AutoscalingConfig, lo: int, hi: int) -> Policy:
        """The package's policy within the replica range its environments allow."""
        return cls(lo, max(hi, lo), a.concurrency_target, a.target_utilization, a.window_s, a.scale_down_delay_s)


class Autoscaler:
    """Holds a short history of load per version; `desired()` applies the policy to it."""

    def __init__(self, signal: LoadSignal | None = None, clock: Callable[[], float] = time.monotonic):
        self.signal = signal
        self.clock = clock
        self._series: dict[tuple[str, int], _Series] = {}
        self._max_window = 3600.0

    def observe(self) -> None:
        """Take one sample of every version's in-flight requests (the reconciler calls this each tick)."""
        now = self.clock()
        current = self.signal.load() if self.signal is not None else {}
        for key in set(current) | set(self._series):
            s = self._series.setdefault(key, _Series())
            s.samples.append((now, float(current.get(key, 0.0))))
            while s.samples and now - s.samples[0][0] > self._max_window:
                s.samples.popleft()

    def average(self, key: tuple[str, int], window_s: float) -> float:
        s = self._series.get(key)
        if s is None or not s.samples:
            return 0.0
        now = self.clock()
        recent = [v for t, v in s.samples if now - t <= window_s]
        return sum(recent) / len(recent) if recent else 0.0

    def current(self, key: tuple[str, int]) -> float:
        s = self._series.get(key)
        return s.samples[-1][1] if s and s.samples else 0.0

    def busy(self, key: tuple[str, int]) -> bool:
        """Whether the latest sample shows any request in flight (or held) for the version."""
        s = self._series.get(key)
        return bool(s and s.samples and s.samples[-1][1] > 0)

    def desired(self, key: tuple[str, int], policy: Policy, current: int) -> int:
        avg = self.average(key, policy.window_s)
        per_replica = policy.concurrency_target * policy.target_utilization
        want = math.ceil(avg / per_replica - 1e-9) if avg > 0 else 0
        if self.busy(key):
            want = max(want, 1)  # a request is waiting right now: never zero
        want = min(max(want, policy.min_replicas), policy.max_replicas)
        s = self._series.setdefault(key, _Series())
        if want >= current:
            s.below_since = None
            return want
        now = self.clock()
        if s.below_since is None:
            s.below_since = now
        if now - s.below_since >= policy.scale_down_delay_s:
            s.below_since = None
            return want
        return current

    def forget(self, keys: set[tuple[str, int]]) -> None:
        """Drop the history of versions that no longer exist."""
        for key in list(self._series):
            if key not in keys:
                del self._series[key]
