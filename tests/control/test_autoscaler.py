"""The autoscaler's policy on a controlled clock: the formula, clamping, up at once, down after the delay,
scale to zero and the wake-up by a held request."""

from __future__ import annotations

from ballast.control.autoscaler import Autoscaler, Policy

KEY = ("chat", 1)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Load:
    """A load signal read from a dict the test changes."""

    def __init__(self, values: dict[tuple[str, int], float]) -> None:
        self.values = values

    def load(self) -> dict[tuple[str, int], float]:
        return dict(self.values)


def _scaler(load: dict[tuple[str, int], float]) -> tuple[Autoscaler, Clock]:
    clock = Clock()
    return Autoscaler(Load(load), clock=clock), clock


def test_desired_is_ceil_of_average_in_flight_over_target_times_utilization() -> None:
    load = {KEY: 0.0}
    a, clock = _scaler(load)
    policy = Policy(min_replicas=1, max_replicas=10, concurrency_target=4, target_utilization=0.5, window_s=10,
                    scale_down_delay_s=30)
    for inflight in (6, 10, 8):  # average 8 over the window -> ceil(8 / (4 * 0.5)) = 4
        load[KEY] = inflight
        a.observe()
        clock.t += 1
    assert a.desired(KEY, policy, current=1) == 4
    load[KEY] = 100
    a.observe()
    assert a.desired(KEY, policy, current=4) == 10  # clamped to max, up at once


def test_scale_down_waits_for_the_delay_and_idle_goes_to_zero() -> None:
    load = {KEY: 6.0}
    a, clock = _scaler(load)
    policy = Policy(min_replicas=0, max_replicas=5, concurrency_target=2, target_utilization=1.0, window_s=5,
                    scale_down_delay_s=20)
    a.observe()
    assert a.desired(KEY, policy, current=0) == 3
    load[KEY] = 0
    current, changed_at = 3, None
    for _ in range(30):
        clock.t += 1
        a.observe()
        new = a.desired(KEY, policy, current)
        if new != current and changed_at is None:
            changed_at = clock.t - 1000
        current = new
    # The wanted count fell below 3 one second after the load stopped; 20 s later it went straight to 0.
    assert (changed_at, current) == (21, 0)


def test_a_held_request_wakes_a_version_at_zero_and_min_is_kept() -> None:
    load: dict[tuple[str, int], float] = {}
    a, clock = _scaler(load)
    zero = Policy(min_replicas=0, max_replicas=3, target_utilization=1.0, window_s=60)
    a.observe()
    assert a.desired(KEY, zero, current=0) == 0
    load[KEY] = 1  # one request held by the gateway (a tiny average over a long window)
    clock.t += 1
    a.observe()
    assert a.desired(KEY, zero, current=0) == 1
    assert a.desired(KEY, Policy(min_replicas=2, max_replicas=3), current=0) == 2
    a.forget(set())
    assert a.average(KEY, 60) == 0.0
