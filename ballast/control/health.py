"""The replica health state machine: states, transitions on probe results, and the one backoff rule.

Pure: `assess` takes what the actuator observed (process alive or not, the latest probe) and the
replica's state and returns a `Verdict`; the reconciler writes it to the store. Keeping it free of
processes and the database is what lets every transition be unit-tested.

    pending ──(fits)──> starting ──(ready probe)──> ready <──(ready probe)── unready
       ^                   │                          │  └──(not ready, live)──> ┘
       └──(lacks resources)┘ fail: died, load failed, startup timeout, failure_threshold liveness probes
    fail: restart at once the first time, then `crashloop` with exponential backoff; stopping: draining
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ballast.config import HealthConfig


class ReplicaState(StrEnum):
    PENDING = "pending"  # waiting for resources the backend lacks; no process
    STARTING = "starting"  # process started (or about to be), not ready yet
    READY = "ready"  # serving: the only state the gateway routes to
    UNREADY = "unready"  # alive but its readiness probe fails
    CRASHLOOP = "crashloop"  # failed repeatedly; starts again after a backoff
    STOPPING = "stopping"  # draining, then stopped and removed


ACTIVE_STATES = (ReplicaState.PENDING, ReplicaState.STARTING, ReplicaState.READY, ReplicaState.UNREADY,
                 ReplicaState.CRASHLOOP)
# Which replicas go first when scaling down: those that serve nothing.
SCALE_DOWN_ORDER: dict[str, int] = {ReplicaState.PENDING: 0, ReplicaState.CRASHLOOP: 0, ReplicaState.STARTING: 1,
                                    ReplicaState.UNREADY: 2, ReplicaState.READY: 3}


def backoff_s(failures: int, base_s: float, max_s: float) -> float:
    """Delay before the next start after `failures` consecutive failures (the first restart is immediate)."""
    if failures < 2:
        return 0.0
    return min(base_s * 2 ** (failures - 2), max_s)


def crashlooping(failures: int) -> bool:
    """A replica that failed twice in a row waits out a backoff instead of restarting at once."""
    return failures >= 2


@dataclass
class Probe:
    """One health probe's answer; None fields were not probed."""

    ready: bool | None = None
    live: bool | None = None
    reason: str = ""
    load_failed: bool = False


@dataclass(frozen=True)
class Verdict:
    """What to do with a replica: `kind` is none, ready, ready_again, unready or fail."""

    kind: str = "none"
    reason: str = ""
    kill: bool = True  # for fail: the process may still run and must be stopped
    live_failures: int = 0  # consecutive failed liveness probes after this observation


NOTHING = Verdict()


def assess(state: str, alive: bool, exit_detail: str, probe: Probe | None, live_failures: int,
           age_s: float | None, health: HealthConfig) -> Verdict:
    """The transition of a replica that has a process, given what was observed this tick."""
    if not alive:
        return Verdict("fail", f"replica process {exit_detail or 'exited'}", kill=False)
    if state == ReplicaState.STARTING:
        return _starting(probe, age_s, health, live_failures)
    if probe is None:
        return Verdict(live_failures=live_failures)
    failures = 0 if probe.live else live_failures + 1
    if failures >= health.failure_threshold:
        return Verdict("fail", f"failed {failures} liveness probes: {probe.reason}")
    if probe.ready and state == ReplicaState.UNREADY:
        return Verdict("ready_again", live_failures=failures)
    if probe.ready is False and probe.live and state == ReplicaState.READY:
        return Verdict("unready", probe.reason, live_failures=failures)
    return Verdict(live_failures=failures)


def _starting(probe: Probe | None, age_s: float | None, health: HealthConfig, live_failures: int) -> Verdict:
    if probe is not None and probe.ready:
        return Verdict("ready")
    if probe is not None and probe.load_failed:
        return Verdict("fail", probe.reason)
    if age_s is not None and age_s > health.startup_timeout_s:
        why = f" ({probe.reason})" if probe and probe.reason else ""
        return Verdict("fail", f"not ready within startup_timeout_s={health.startup_timeout_s:g}{why}")
    return Verdict(live_failures=live_failures)
