"""The adapter gate: evaluate a new LoRA adapter against production and ship it as a canary when it wins.

The candidate is a new VERSION of the deployment: the production version's package plus the adapter's files,
declared in `engine.adapters` and made the deployment's default (`engine.default_adapter`), so a request for the
deployment's name is answered with the adapter. It is deployed unpromoted and evaluated as `DEPLOYMENT:N` (the
gateway scales an addressed version from zero; unused, it retires after the grace period). A runtime load
(`/v1/load_lora_adapter`) was not chosen: it needs LoRA on in production's replicas, lives only in the replicas
that were up (a restart or scale-up forgets it), and would evaluate something other than what ships. Here the
version evaluated is the version canaried, immutable, and rollback is the control plane's own.

Every step is an event naming the job: `eval`, `gate_passed` | `gate_rejected`, `canary` (the control plane's;
its actor names the job), then (from the guard, `platform/canary_guard.py`) `canary_promoted` | `canary_rolled_back`.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select

from ballast.config.models import check_adapter_name
from ballast.control import views
from ballast.control.errors import ControlError
from ballast.control.eval_store import GATE_HELD_OUT, GATE_SEED, examples
from ballast.control.evals import parse_metric
from ballast.platform.canary_guard import GuardLimits, guard_canary
from ballast.platform.canary_guard import record_event as _event
from ballast.platform.evals import EvalContext, EvalSpec, run_eval
from ballast.store import Version


@dataclass
class GateResult:
    deployment: str
    adapter: str
    metric: str
    margin: float
    production_version: int
    candidate_version: int  # the version built for the adapter (registered whatever the decision)
    production_score: float
    candidate_score: float
    decision: str  # canary | rejected
    version: int | None  # the version now canaried (None when rejected)
    eval_id: int | None
    job_id: str | None
    guard: asyncio.Task[str] | None = field(default=None, repr=False)  # ends with "promoted" | "rolled_back"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "guard"}


def _production(ctx: EvalContext, deployment: str, env: str) -> tuple[int, str, dict[str, Any]]:
    """(version, package path, config) of what `env` serves now (its stable version, not a canary)."""
    desc = ctx.control.describe(deployment)
    envs = {e["name"]: e for e in desc.get("environments", [])}
    if env not in envs or envs[env].get("version") is None:
        raise ControlError(404, f"`{deployment}` has no version in {env}", "not_found", "env")
    number = int(envs[env]["version"])
    with ctx.control.sessions() as s:
        dep = views.get_deployment(s, deployment)
        v = s.scalar(select(Version).where(Version.deployment_id == dep.id, Version.number == number))
        assert v is not None
        return number, v.package_path, dict(v.config)


def _candidate_package(prod_path: str, config: dict[str, Any], adapter_dir: Path, name: str, into: Path) -> Path:
    """A copy of production's package with the adapter under `adapters/NAME` as the default model."""
    engine = config.get("engine") or {}
    if engine.get("kind") != "native":
        raise ControlError(400, "the adapter gate needs a deployment served by the native engine", "not_an_llm",
                           "deployment")
    pkg = into / "package"
    shutil.copytree(prod_path, pkg, symlinks=True)
    shutil.copytree(adapter_dir, pkg / "adapters" / name, dirs_exist_ok=True)
    raw = yaml.safe_load((pkg / "ballast.yaml").read_text()) or {}
    raw.setdefault("engine", {}).setdefault("adapters", {})[name] = f"adapters/{name}"
    raw["engine"]["default_adapter"] = name
    (pkg / "ballast.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return pkg


def gate_actor(actor: str, job_id: str | None) -> str:
    """Who moved traffic: the job, when the gate runs for one (the events' actor column holds 64 characters)."""
    return (f"adapter-gate job {job_id}" if job_id else f"adapter-gate ({actor})")[:64]


def _check_args(adapter_dir: Path, adapter_name: str, metric: str, margin: float, canary_percent: int,
                hold_s: float) -> None:
    """Everything that can be refused is refused before a version is made."""
    parse_metric(metric)
    try:
        check_adapter_name(adapter_name)
    except ValueError as e:
        raise ControlError(400, str(e), "invalid_adapter", "adapter_name") from None
    try:
        found = (adapter_dir / "adapter_config.json").is_file()
    except OSError:  # a name too long for the filesystem, say
        found = False
    if not found:
        raise ControlError(404, f"no PEFT adapter at {adapter_dir} (no adapter_config.json)", "adapter_not_found",
                           "adapter_dir")
    if not 1 <= canary_percent <= 99:
        raise ControlError(400, "canary_percent must be between 1 and 99", "invalid_canary", "canary_percent")
    if not 0 <= hold_s <= 86400 or not -1 <= margin <= 1:
        raise ControlError(400, "hold_s must be in 0..86400 and margin in -1..1", "invalid_gate", "hold_s")


async def ship_adapter(ctx: EvalContext, *, deployment: str, env: str, adapter_dir: Path, adapter_name: str,
                       dataset: str, metric: str, margin: float, canary_percent: int, hold_s: float,
                       job_id: str | None, actor: str = "system", limits: GuardLimits | None = None,
                       max_tokens: int = 64, concurrency: int = 4) -> GateResult:
    """Register the adapter as a new version, evaluate it against `env`'s version on the dataset's held-out split,
    and when candidate − production ≥ margin start it as a canary of `canary_percent`% that a background guard
    promotes after `hold_s` (or rolls back). Returns once the canary started (or the adapter was rejected)."""
    adapter_dir = Path(adapter_dir)
    _check_args(adapter_dir, adapter_name, metric, margin, canary_percent, hold_s)
    prod_version, prod_path, config = await asyncio.to_thread(_production, ctx, deployment, env)
    await asyncio.to_thread(examples, ctx.datasets, dataset, "heldout", GATE_HELD_OUT, GATE_SEED, None)
    ctx.control.home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ctx.control.home) as tmp:
        pkg = await asyncio.to_thread(_candidate_package, prod_path, config, adapter_dir, adapter_name, Path(tmp))
        deployed = await asyncio.to_thread(ctx.control.deploy, pkg, deployment, actor=actor,
                                           source=f"adapter {adapter_name}" + (f" (job {job_id})" if job_id else ""))
    candidate = int(deployed["version"])
    await ctx.gateway.refresh_now()
    spec = EvalSpec(targets=[f"{deployment}:{prod_version}", f"{deployment}:{candidate}"], dataset=dataset,
                    split="heldout", metrics=[metric], held_out=GATE_HELD_OUT, seed=GATE_SEED, max_tokens=max_tokens,
                    concurrency=concurrency)
    result = await run_eval(ctx, spec, actor=actor, job_id=job_id)
    [prod_score, cand_score] = [result["scores"][t][result["metrics"][0]] for t in spec.targets]
    won = cand_score - prod_score >= margin
    gate = GateResult(deployment, adapter_name, metric, margin, prod_version, candidate, prod_score, cand_score,
                      "canary" if won else "rejected", candidate if won else None, result.get("id"), job_id)
    verdict = f"{metric} {cand_score:.3f} vs production's {prod_score:.3f} (margin {margin:+g})"
    if not won:
        await asyncio.to_thread(_event, ctx, deployment, "gate_rejected", f"adapter {adapter_name} (version "
                                f"{candidate}) rejected: {verdict}; it stays registered", actor, gate.to_dict())
        return gate
    guard = {"env": env, "hold_s": hold_s, "limits": asdict(limits or GuardLimits()),
             "actor": gate_actor(actor, job_id)}  # what a restarted platform needs to guard it again
    await asyncio.to_thread(_event, ctx, deployment, "gate_passed", f"adapter {adapter_name} (version {candidate}) "
                            f"passed: {verdict}", actor, {**gate.to_dict(), "guard": guard})
    # The control plane's own `canary` event records it; its actor names the job.
    await asyncio.to_thread(ctx.control.promote, deployment, candidate, env, canary=canary_percent,
                            actor=gate_actor(actor, job_id))
    await ctx.gateway.refresh_now()
    task = asyncio.create_task(guard_canary(ctx, deployment, env, prod_version, candidate, hold_s,
                                            limits or GuardLimits(), job_id=job_id, actor=gate_actor(actor, job_id)))
    ctx.tasks.add(task)
    task.add_done_callback(ctx.tasks.discard)
    gate.guard = task
    return gate


__all__ = ["GateResult", "GuardLimits", "ship_adapter"]
