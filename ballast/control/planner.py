"""The pure planner: desired state in, decisions and events out. No processes, no database.

From deployments, versions, environments and replica counts (plain dataclasses) it lands pending
promotions whose version has ready replicas, steps canary ramps, and computes each version's desired
replica count (autoscaler within the environments' ranges, retirement of versions that left every
environment). It mutates the dataclasses it was given; the reconciler writes back what changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any, Protocol

from ballast.config import BallastConfig
from ballast.control.autoscaler import Policy
from ballast.control.events import EventSpec
from ballast.control.times import aware

Key = tuple[str, int]  # (deployment, version number)


@dataclass
class EnvState:
    """An environment's pointers (mirrors the `environments` row)."""

    id: int | None
    deployment_id: int
    name: str
    version: int | None = None
    previous_version: int | None = None
    canary_version: int | None = None
    canary_percent: int = 0
    canary_step_percent: int = 0
    canary_started_at: datetime | None = None
    canary_ramp_s: float = 0.0
    min_replicas: int | None = None
    max_replicas: int | None = None
    pending_version: int | None = None
    pending_canary_percent: int = 0
    pending_ramp_s: float = 0.0
    pending_actor: str = ""
    updated_at: datetime | None = None


ENV_FIELDS = tuple(f.name for f in fields(EnvState))


@dataclass
class VersionState:
    id: int
    deployment_id: int
    deployment: str
    number: int
    config: BallastConfig
    desired: int = 0
    min_replicas: int = 0
    max_replicas: int = 1
    retire_at: datetime | None = None
    revision: int = 0
    package_path: str = ""
    dev: bool = False


@dataclass
class VersionPlan:
    """What the actuator works toward for one version."""

    deployment: str
    number: int
    desired: int
    revision: int
    package_path: str
    config: BallastConfig
    dev: bool

    @property
    def grace_s(self) -> float:
        return self.config.runtime.shutdown_grace_s


@dataclass
class ClusterState:
    deployments: dict[int, str]
    versions: list[VersionState]
    envs: list[EnvState]
    ready: dict[Key, int] = field(default_factory=dict)  # ready replicas per version
    present: dict[Key, int] = field(default_factory=dict)  # replicas of any state per version


@dataclass
class PlanResult:
    versions: dict[Key, VersionPlan]
    events: list[EventSpec]
    routing_changed: bool = False  # a pointer or a canary weight moved


class Scaler(Protocol):
    """The autoscaler as the planner sees it."""

    def desired(self, key: Key, policy: Policy, current: int) -> int: ...

    def busy(self, key: Key) -> bool: ...

    def current(self, key: Key) -> float: ...


def canary_percent_at(step: int, ramp_s: float, elapsed_s: float) -> int:
    """Stepwise ramp: start at `step` percent and add `step` at even intervals until 100 at `ramp_s`."""
    if ramp_s <= 0:
        return step
    if elapsed_s >= ramp_s:
        return 100
    steps = max(1, math.ceil((100 - step) / max(step, 1)))
    k = int(elapsed_s / (ramp_s / steps))
    return min(100, step + k * step) if k < steps else 100


def env_traffic(e: Any) -> list[tuple[int, int]]:
    """[(version, percent)] of an environment now (empty before its first promotion lands)."""
    if e.version is None:
        return []
    if e.canary_version is not None and e.canary_percent > 0:
        return [(e.version, 100 - e.canary_percent), (e.canary_version, e.canary_percent)]
    return [(e.version, 100)]


def promote_env(env: EnvState, deployment: str, number: int, canary: int, ramp_s: float, actor: str,
                now: datetime, kind: str = "promoted") -> tuple[str, EventSpec]:
    """Move the pointer (the target has ready replicas): a canary split, or all traffic at once."""
    env.pending_version = None
    env.pending_canary_percent = 0
    env.pending_ramp_s = 0.0
    env.updated_at = now
    if canary and 0 < canary < 100 and env.version is not None and env.version != number:
        env.canary_version = number
        env.canary_percent = env.canary_step_percent = canary
        env.canary_ramp_s = ramp_s
        env.canary_started_at = now
        ramp = f", ramping to 100% over {ramp_s:g}s" if ramp_s > 0 else ""
        return "canary", EventSpec(deployment, "canary", f"{env.name}: version {number} gets {canary}% of traffic "
                                   f"(version {env.version} the rest){ramp}", actor,
                                   {"env": env.name, "version": number, "percent": canary, "ramp_s": ramp_s})
    old = env.version
    if old is not None and old != number:
        env.previous_version = old
    env.version = number
    env.canary_version = None
    env.canary_percent = 0
    env.canary_started_at = None
    env.canary_ramp_s = 0.0
    what = f"from version {old} " if old is not None and old != number else ""
    return "promoted", EventSpec(deployment, kind, f"{env.name}: {what}to version {number}", actor,
                                 {"env": env.name, "version": number, "previous": old})


def _step_env(env: EnvState, dep: str, state: ClusterState, numbers: set[int], now: datetime,
              out: PlanResult) -> None:
    """Land a pending promotion whose version is ready; move a canary ramp one step."""
    if env.pending_version is not None:
        if env.pending_version not in numbers:
            env.pending_version = None
        elif state.ready.get((dep, env.pending_version), 0) > 0:
            _, ev = promote_env(env, dep, env.pending_version, env.pending_canary_percent, env.pending_ramp_s,
                                env.pending_actor or "system", now)
            out.events.append(ev)
            out.routing_changed = True
    if env.canary_version is None or env.canary_ramp_s <= 0 or env.canary_started_at is None:
        return
    elapsed = (now - aware(env.canary_started_at)).total_seconds()
    pct = canary_percent_at(env.canary_step_percent or env.canary_percent, env.canary_ramp_s, elapsed)
    if pct >= 100:
        _, ev = promote_env(env, dep, env.canary_version, 0, 0.0, "system", now, kind="canary_completed")
        out.events.append(ev)
        out.routing_changed = True
    elif pct != env.canary_percent:
        env.canary_percent = pct
        env.updated_at = now
        out.events.append(EventSpec(dep, "canary_step", f"{env.name}: version {env.canary_version} now gets "
                                    f"{pct}% of traffic", data={"env": env.name, "version": env.canary_version,
                                                                "percent": pct}))
        out.routing_changed = True


def _desired(v: VersionState, users: list[EnvState], state: ClusterState, scaler: Scaler, now: datetime,
             grace_s: float, events: list[EventSpec]) -> int:
    """A version's replica count: autoscaled while an environment uses it, else it retires."""
    key = (v.deployment, v.number)
    if users:
        lo = max(e.min_replicas if e.min_replicas is not None else v.min_replicas for e in users)
        hi = max(e.max_replicas if e.max_replicas is not None else v.max_replicas for e in users)
        if any(e.pending_version == v.number or e.canary_version == v.number for e in users):
            lo = max(lo, 1)  # a promotion waits for a ready replica and a canary must be serving
        v.retire_at = None
        return scaler.desired(key, Policy.from_config(v.config.autoscaling, lo, hi), v.desired)
    if scaler.busy(key):
        # Addressed directly (`chat:3`) although no environment uses it: serve, and retire later.
        v.retire_at = now + timedelta(seconds=grace_s)
        return max(v.desired, 1)
    if not (v.desired > 0 or state.present.get(key)):
        return 0
    if v.retire_at is None:
        v.retire_at = now + timedelta(seconds=grace_s)
        events.append(EventSpec(v.deployment, "retiring", f"version {v.number} left every environment: it drains "
                                f"and scales to zero after {grace_s:g}s (rollback is instant until then)",
                                data={"version": v.number}))
    elif now >= aware(v.retire_at) and v.desired > 0:
        events.append(EventSpec(v.deployment, "retired", f"version {v.number} scaled to zero",
                                data={"version": v.number}))
        return 0
    return v.desired


def plan(state: ClusterState, scaler: Scaler, now: datetime, retire_grace_s: float) -> PlanResult:
    """One planning pass over the whole desired state."""
    out = PlanResult({}, [])
    numbers: dict[int, set[int]] = {}
    for v in state.versions:
        numbers.setdefault(v.deployment_id, set()).add(v.number)
    for e in state.envs:
        dep = state.deployments.get(e.deployment_id)
        if dep is not None:
            _step_env(e, dep, state, numbers.get(e.deployment_id, set()), now, out)
    in_use: dict[tuple[int, int], list[EnvState]] = {}
    for e in state.envs:
        for n in {n for n in (e.version, e.canary_version, e.pending_version) if n is not None}:
            in_use.setdefault((e.deployment_id, n), []).append(e)
    for v in state.versions:
        if v.deployment_id not in state.deployments:
            continue
        users = in_use.get((v.deployment_id, v.number), [])
        desired = _desired(v, users, state, scaler, now, retire_grace_s, out.events)
        if desired != v.desired:
            if users:
                load = scaler.current((v.deployment, v.number))
                out.events.append(EventSpec(v.deployment, "autoscale", f"version {v.number}: {v.desired} -> "
                                            f"{desired} replicas (in flight now: {load:g})",
                                            data={"version": v.number, "previous": v.desired, "desired": desired}))
            v.desired = desired
        out.versions[(v.deployment, v.number)] = VersionPlan(v.deployment, v.number, desired, v.revision,
                                                             v.package_path, v.config, v.dev)
    return out
