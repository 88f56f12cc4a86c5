"""The replica health state machine and its one backoff rule, without processes."""

from __future__ import annotations

from ballast.config import HealthConfig
from ballast.control.health import Probe, ReplicaState, assess, backoff_s, crashlooping

HEALTH = HealthConfig(startup_timeout_s=30, liveness_period_s=1, failure_threshold=3)
LIVE_READY = Probe(ready=True, live=True)


def test_starting_becomes_ready_or_fails() -> None:
    assert assess(ReplicaState.STARTING, True, "", LIVE_READY, 0, 1.0, HEALTH).kind == "ready"
    assert assess(ReplicaState.STARTING, True, "", Probe(ready=False, live=True), 0, 1.0, HEALTH).kind == "none"
    late = assess(ReplicaState.STARTING, True, "", Probe(ready=False, live=True, reason="loading"), 0, 31.0, HEALTH)
    assert late.kind == "fail" and "startup_timeout_s=30" in late.reason and "loading" in late.reason
    broken = Probe(ready=False, live=False, reason="load failed: boom", load_failed=True)
    assert assess(ReplicaState.STARTING, True, "", broken, 0, 1.0, HEALTH).kind == "fail"
    dead = assess(ReplicaState.STARTING, False, "exited with code 3", None, 0, 1.0, HEALTH)
    assert (dead.kind, dead.kill) == ("fail", False) and "code 3" in dead.reason


def test_liveness_failures_count_up_to_the_threshold() -> None:
    down = Probe(ready=False, live=False, reason="liveness probe failed: ConnectTimeout")
    v1 = assess(ReplicaState.READY, True, "", down, 0, 99.0, HEALTH)
    v2 = assess(ReplicaState.READY, True, "", down, v1.live_failures, 99.0, HEALTH)
    assert (v1.kind, v1.live_failures, v2.kind, v2.live_failures) == ("none", 1, "none", 2)
    v3 = assess(ReplicaState.READY, True, "", down, v2.live_failures, 99.0, HEALTH)
    assert v3.kind == "fail" and v3.kill and "3 liveness probes" in v3.reason
    assert assess(ReplicaState.READY, True, "", LIVE_READY, 2, 99.0, HEALTH).live_failures == 0
    assert assess(ReplicaState.READY, True, "", None, 2, 99.0, HEALTH).live_failures == 2  # not probed


def test_ready_and_unready_flip_on_readiness() -> None:
    busy = Probe(ready=False, live=True, reason="draining")
    assert assess(ReplicaState.READY, True, "", busy, 0, 9.0, HEALTH).kind == "unready"
    assert assess(ReplicaState.UNREADY, True, "", LIVE_READY, 0, 9.0, HEALTH).kind == "ready_again"


def test_one_backoff_rule() -> None:
    assert not crashlooping(1) and crashlooping(2)
    assert [backoff_s(n, 0.5, 4.0) for n in range(1, 7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0]
