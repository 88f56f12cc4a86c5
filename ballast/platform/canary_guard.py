"""The canary guard: after the adapter gate starts a canary, watch it against the stable version for a hold
period, then promote it to all traffic, or roll it back.

Error rates come from the gateway's per-version request counter (`ballast_gateway_requests`, so a replica that
refuses or dies counts too); latency from each version's replicas (`ballast_request_duration_seconds` of the
inference routes). Both are deltas over the hold. A canary that got no traffic in the hold has nothing against
it and is promoted (the event says so). The guard runs in the platform process; what it guards is in the
`gate_passed` event, so a platform that restarts during the hold starts the guard again (`resume_guards`), with a
whole new hold (the gateway's counters start again at zero), unless the canary was promoted or rolled back
meanwhile. With `--ha` a restarted platform leaves it to an operator (two platforms must not both decide).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from ballast.control.events import add_event
from ballast.observe.replica_auth import headers_for
from ballast.store import Event

if TYPE_CHECKING:
    from ballast.platform.evals import EvalContext

log = logging.getLogger("ballast.platform")
LIVE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class GuardLimits:
    max_error_rate_delta: float = 0.05  # the canary's error rate may exceed the stable's by this much
    max_latency_ratio: float = 2.0  # ... and its mean latency the stable's times this,
    latency_slack_s: float = 0.05  # plus this (small numbers are noisy)


@dataclass
class Stats:
    requests: float = 0.0
    errors: float = 0.0
    latency_sum: float = 0.0
    latency_count: float = 0.0

    def minus(self, o: Stats) -> Stats:
        return Stats(self.requests - o.requests, self.errors - o.errors, self.latency_sum - o.latency_sum,
                     self.latency_count - o.latency_count)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests > 0 else 0.0

    @property
    def mean_latency(self) -> float | None:
        return self.latency_sum / self.latency_count if self.latency_count > 0 else None


def verdict(stable: Stats, canary: Stats, limits: GuardLimits) -> tuple[bool, str]:
    """Whether the canary held (over one hold period's deltas), and why in words."""
    if canary.requests <= 0:
        return True, "no canary traffic in the hold; nothing against it"
    if canary.error_rate > stable.error_rate + limits.max_error_rate_delta:
        return False, f"error rate {canary.error_rate:.1%} vs stable {stable.error_rate:.1%}"
    c, s = canary.mean_latency, stable.mean_latency
    if c is not None and s is not None and c > s * limits.max_latency_ratio + limits.latency_slack_s:
        return False, f"mean latency {c * 1000:.0f} ms vs stable {s * 1000:.0f} ms"
    lat = f", mean latency {c * 1000:.0f} ms" if c is not None else ""
    return True, f"{canary.requests:g} requests, error rate {canary.error_rate:.1%}{lat}"


def _gateway_counts(ctx: EvalContext, deployment: str, version: int) -> tuple[float, float]:
    total = errors = 0.0
    for family in ctx.gateway.metrics.requests.collect():
        for s in family.samples:
            if s.name.endswith("_total") and s.labels.get("deployment") == deployment \
                    and s.labels.get("version") == str(version):
                total += s.value
                errors += s.value if s.labels.get("status", "").startswith("5") else 0.0
    return total, errors


async def _replica_latency(replicas: list[tuple[str, str]]) -> tuple[float, float]:
    """Latency sums and counts over (replica id, url) pairs."""
    total = count = 0.0
    async with httpx.AsyncClient(timeout=10) as client:
        for rid, url in replicas:
            try:
                text = (await client.get(url + "/metrics", headers=headers_for(rid))).text
            except httpx.HTTPError:
                continue
            for family in text_string_to_metric_families(text):
                if family.name != "ballast_request_duration_seconds":
                    continue
                for s in family.samples:
                    if s.labels.get("route", "").startswith("/v1/"):
                        total += s.value if s.name.endswith("_sum") else 0.0
                        count += s.value if s.name.endswith("_count") else 0.0
    return total, count


async def sample(ctx: EvalContext, deployment: str, version: int) -> Stats:
    requests, errors = _gateway_counts(ctx, deployment, version)
    dep = ctx.gateway.routes.get(deployment)
    v = dep.versions.get(version) if dep else None
    lat_sum, lat_count = await _replica_latency([(ep.replica_id, ep.url) for ep in v.endpoints] if v else [])
    return Stats(requests, errors, lat_sum, lat_count)


def _canary_of(ctx: EvalContext, deployment: str, env: str) -> dict[str, Any]:
    envs = {e["name"]: e for e in ctx.control.describe(deployment).get("environments", [])}
    return envs.get(env) or {}


async def _wait_live(ctx: EvalContext, deployment: str, env: str, canary: int) -> bool:
    deadline = time.monotonic() + LIVE_TIMEOUT_S
    while time.monotonic() < deadline:
        e = await asyncio.to_thread(_canary_of, ctx, deployment, env)
        if (e.get("canary") or {}).get("version") == canary:
            return True
        if (e.get("pending") or {}).get("version") != canary:
            return False  # promoted, rolled back or replaced meanwhile: no longer ours to decide
        await asyncio.sleep(0.5)
    return False


def record_event(ctx: EvalContext, deployment: str, kind: str, message: str, actor: str, data: dict[str, Any]) -> None:
    """One event (`data` keys other than `deployment` become its data), in its own transaction."""
    with ctx.control.sessions() as s:
        add_event(s, deployment, kind, message, actor, **{k: v for k, v in data.items() if k != "deployment"})
        s.commit()


async def guard_canary(ctx: EvalContext, deployment: str, env: str, stable: int, canary: int, hold_s: float,
                       limits: GuardLimits, *, job_id: str | None = None, actor: str = "system") -> str:
    """Hold, compare, then promote or roll back; returns `promoted`, `rolled_back` or `superseded`."""
    data = {"version": canary, "stable": stable, "env": env, "job_id": job_id}
    try:
        if not await _wait_live(ctx, deployment, env, canary):
            await asyncio.to_thread(record_event, ctx, deployment, "canary_superseded", f"{env}: version {canary} is "
                                    "no longer a canary; the guard stops", actor, data)
            return "superseded"
        before = {v: await sample(ctx, deployment, v) for v in (stable, canary)}
        await asyncio.sleep(hold_s)
        if ((await asyncio.to_thread(_canary_of, ctx, deployment, env)).get("canary") or {}).get("version") != canary:
            await asyncio.to_thread(record_event, ctx, deployment, "canary_superseded", f"{env}: version {canary} was "
                                    "promoted or rolled back during the hold; the guard stops", actor, data)
            return "superseded"
        after = {v: await sample(ctx, deployment, v) for v in (stable, canary)}
        ok, why = verdict(after[stable].minus(before[stable]), after[canary].minus(before[canary]), limits)
        if ok:
            await asyncio.to_thread(ctx.control.promote, deployment, canary, env, actor=actor)
            kind, outcome, what = "canary_promoted", "promoted", "promoted to all traffic"
        else:
            await asyncio.to_thread(ctx.control.rollback, deployment, env, actor=actor)
            kind, outcome, what = "canary_rolled_back", "rolled_back", f"rolled back to version {stable}"
        await ctx.gateway.refresh_now()
        await asyncio.to_thread(record_event, ctx, deployment, kind, f"{env}: canary version {canary} {what} after "
                                f"{hold_s:g}s: {why}", actor, {**data, "reason": why})
        return outcome
    except Exception:
        log.exception("the canary guard of %s v%s failed; the canary stays as it is", deployment, canary)
        raise


DECIDED = ("canary_promoted", "canary_rolled_back", "canary_superseded")


def unguarded(ctx: EvalContext) -> list[dict[str, Any]]:
    """Canaries a gate started whose guard never decided (the platform stopped during the hold): the
    `gate_passed` events with no later decision for their version."""
    with ctx.control.sessions() as s:
        rows = s.scalars(select(Event).where(Event.kind.in_(("gate_passed", *DECIDED))).order_by(Event.id)).all()
        events = [(r.deployment, r.kind, dict(r.data or {})) for r in rows]
    open_: dict[tuple[str, int], dict[str, Any]] = {}
    for deployment, kind, data in events:
        version = data.get("version")
        if not isinstance(version, int):
            continue
        if kind == "gate_passed" and isinstance(data.get("guard"), dict):
            open_[(deployment, version)] = {"deployment": deployment, **data}
        elif kind in DECIDED:
            open_.pop((deployment, version), None)
    return list(open_.values())


async def resume_guards(ctx: EvalContext) -> list[asyncio.Task[str]]:
    """Start the guard again for every canary left unguarded by a restart (each with a whole new hold)."""
    tasks: list[asyncio.Task[str]] = []
    for gate in await asyncio.to_thread(unguarded, ctx):
        g = gate["guard"]
        deployment, canary, stable = gate["deployment"], int(gate["version"]), int(gate["production_version"])
        data = {"version": canary, "stable": stable, "env": g["env"], "job_id": gate.get("job_id")}
        await asyncio.to_thread(record_event, ctx, deployment, "canary_guard_resumed", f"{g['env']}: the guard of "
                                f"canary version {canary} starts again after a platform restart ({g['hold_s']:g}s "
                                "hold)", g.get("actor") or "system", data)
        limits = GuardLimits(**{k: float(v) for k, v in (g.get("limits") or {}).items()
                                if k in GuardLimits.__dataclass_fields__})
        task = asyncio.create_task(guard_canary(ctx, deployment, g["env"], stable, canary, float(g["hold_s"]), limits,
                                                job_id=gate.get("job_id"), actor=g.get("actor") or "system"))
        ctx.tasks.add(task)
        task.add_done_callback(ctx.tasks.discard)
        tasks.append(task)
    return tasks
