"""The pure planner: state in, decisions and events out, with no process and no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ballast.config import BallastConfig
from ballast.control.autoscaler import Policy
from ballast.control.planner import ClusterState, EnvState, VersionState, canary_percent_at, env_traffic, plan

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class FixedScaler:
    """Wants the policy's minimum, or `load` replicas when some version is busy."""

    def __init__(self, busy: dict[tuple[str, int], int] | None = None) -> None:
        self.load = busy or {}

    def desired(self, key: tuple[str, int], policy: Policy, current: int) -> int:
        return min(max(self.load.get(key, 0), policy.min_replicas), policy.max_replicas)

    def busy(self, key: tuple[str, int]) -> bool:
        return self.load.get(key, 0) > 0

    def current(self, key: tuple[str, int]) -> float:
        return float(self.load.get(key, 0))


def _version(n: int, desired: int = 0, **kw: object) -> VersionState:
    return VersionState(id=n, deployment_id=1, deployment="chat", number=n, config=BallastConfig(name="chat"),
                        desired=desired, min_replicas=1, max_replicas=3, **kw)  # type: ignore[arg-type]


def _state(versions: list[VersionState], env: EnvState, ready: dict[tuple[str, int], int] | None = None
           ) -> ClusterState:
    return ClusterState({1: "chat"}, versions, [env], ready or {}, {k: v for k, v in (ready or {}).items()})


def test_pending_promotion_lands_only_once_its_version_is_ready() -> None:
    env = EnvState(id=1, deployment_id=1, name="production", version=1, pending_version=2, pending_actor="ann")
    versions = [_version(1, 1), _version(2, 0)]
    out = plan(_state(versions, env, {("chat", 1): 1}), FixedScaler(), NOW, 60)
    assert env.version == 1 and env.pending_version == 2 and not out.routing_changed
    assert out.versions[("chat", 2)].desired == 1  # a pending promotion needs a replica
    out = plan(_state(versions, env, {("chat", 1): 1, ("chat", 2): 1}), FixedScaler(), NOW, 60)
    assert (env.version, env.previous_version, env.pending_version) == (2, 1, None)
    assert out.routing_changed
    assert [(e.kind, e.actor) for e in out.events] == [("promoted", "ann"), ("retiring", "system")]


def test_canary_ramp_steps_then_completes() -> None:
    env = EnvState(id=1, deployment_id=1, name="production", version=1, canary_version=2, canary_percent=25,
                   canary_step_percent=25, canary_ramp_s=300, canary_started_at=NOW)
    versions = [_version(1, 1), _version(2, 1)]
    out = plan(_state(versions, env), FixedScaler(), NOW + timedelta(seconds=110), 60)
    assert env.canary_percent == 50 and env_traffic(env) == [(1, 50), (2, 50)]
    assert [e.kind for e in out.events] == ["canary_step"] and out.routing_changed
    out = plan(_state(versions, env), FixedScaler(), NOW + timedelta(seconds=301), 60)
    assert (env.version, env.canary_version) == (2, None)
    assert [e.kind for e in out.events] == ["canary_completed", "retiring"]  # version 1 left production
    assert canary_percent_at(10, 100, 0) == 10 and canary_percent_at(10, 100, 100) == 100


def test_version_left_by_every_environment_retires_after_the_grace() -> None:
    env = EnvState(id=1, deployment_id=1, name="production", version=2)
    old = _version(1, 1)
    out = plan(_state([old, _version(2, 1)], env, {("chat", 1): 1}), FixedScaler(), NOW, 60)
    assert old.retire_at == NOW + timedelta(seconds=60) and out.versions[("chat", 1)].desired == 1
    assert [e.kind for e in out.events] == ["retiring"]
    out = plan(_state([old, _version(2, 1)], env, {("chat", 1): 1}), FixedScaler(), NOW + timedelta(seconds=61), 60)
    assert out.versions[("chat", 1)].desired == 0 and [e.kind for e in out.events] == ["retired"]


def test_environment_range_and_autoscaler_decide_the_count() -> None:
    env = EnvState(id=1, deployment_id=1, name="production", version=1, min_replicas=2, max_replicas=5)
    v = _version(1, 2)
    out = plan(_state([v], env), FixedScaler({("chat", 1): 9}), NOW, 60)
    assert out.versions[("chat", 1)].desired == 5 and v.desired == 5
    assert [(e.kind, e.data["previous"], e.data["desired"]) for e in out.events] == [("autoscale", 2, 5)]


def test_directly_addressed_version_is_served_although_no_environment_uses_it() -> None:
    env = EnvState(id=1, deployment_id=1, name="production", version=2)
    out = plan(_state([_version(1, 0), _version(2, 1)], env), FixedScaler({("chat", 1): 1}), NOW, 60)
    assert out.versions[("chat", 1)].desired == 1
