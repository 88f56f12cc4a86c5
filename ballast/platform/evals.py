"""The eval runner: a dataset's examples through the gateway, at batch priority and greedy, scored per metric.

Requests go through the platform's own gateway (auth, target resolution, adapters, canary splits, metering), in
process over ASGI with the platform's internal eval key, so an eval measures exactly what clients get and never
depends on the platform's listen address or TLS. Concurrency is bounded; every request has a timeout.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx

from ballast.control import ControlPlane
from ballast.control.datasets import Datasets
from ballast.control.errors import ControlError
from ballast.control.eval_store import MAX_STORED_EXAMPLES, EvalExample, examples, internal_key, record_eval
from ballast.control.evals import Metric, Scored, delta, differs, mean_scores, parse_metric, prompt_and_reference, score
from ballast.gateway.service import Gateway
from ballast.gateway.targets import parse_model
from ballast.openai import APIError
from ballast.openai.priority import PRIORITY_BATCH, PRIORITY_HEADER

REQUEST_TIMEOUT_S = 300.0
MAX_EXAMPLES = 5000
COLD_START_TRIES = 3  # the first request, while a target's replica cold-starts (the gateway holds each one)


@dataclass
class EvalContext:
    """What evals and the adapter gate need of the running platform (built once by `create_app`)."""

    control: ControlPlane
    gateway: Gateway
    app: Any = None  # the platform's ASGI app (set once it is built); requests go through its gateway routes
    _key: str | None = None
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)  # canary guards running in the background

    @property
    def datasets(self) -> Datasets:
        return Datasets(self.control.sessions)

    async def http(self) -> httpx.AsyncClient:
        """A client of the platform's own gateway, authenticated with the internal eval key."""
        if self._key is None:
            self._key = await asyncio.to_thread(internal_key, self.control.sessions)
            await self.gateway.refresh_now()
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://ballast.internal",
                                 headers={"Authorization": f"Bearer {self._key}", PRIORITY_HEADER: str(PRIORITY_BATCH)},
                                 timeout=REQUEST_TIMEOUT_S)

    def deployment_of(self, target: str) -> str:
        """The deployment a target names (`chat:3`, `chat/sql`, `sql@staging`), 404 when none does."""
        try:
            dep_target, _ = self.gateway.adapters.split(target)
            name = parse_model(dep_target)[0]
        except APIError as e:
            raise ControlError(e.status, e.message, e.code or "invalid_target", "targets") from None
        if name not in self.gateway.routes:
            raise ControlError(404, f"no deployment or adapter `{target}`", "model_not_found", "targets")
        return name


@dataclass
class EvalSpec:
    targets: list[str]
    dataset: str
    split: str = "heldout"
    metrics: list[str] = field(default_factory=lambda: ["exact"])
    limit: int | None = None
    held_out: float = 0.2
    seed: int = 0
    max_tokens: int = 64
    concurrency: int = 4


async def _one(client: httpx.AsyncClient, target: str, prompt: list[dict[str, Any]],
               max_tokens: int) -> tuple[str | None, int, str | None]:
    """(output text or None, HTTP status, error message) of one greedy chat completion."""
    body = {"model": target, "messages": prompt, "temperature": 0, "max_tokens": max_tokens}
    try:
        r = await client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as e:
        return None, 502, f"{type(e).__name__}"
    try:
        data = r.json()
    except ValueError:
        return None, r.status_code, "not JSON"
    if r.status_code != 200:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        return None, r.status_code, str(err.get("message", r.text[:200]))
    content = data["choices"][0]["message"].get("content")
    return content if isinstance(content, str) else "", 200, None


async def _run_target(ctx: EvalContext, spec: EvalSpec, target: str, rows: list[tuple[EvalExample, list[Any], str]],
                      metrics: list[Metric]) -> list[Scored]:
    """Every example through one target; the first one alone, so a bad target fails fast with its status."""
    async with await ctx.http() as client:
        for _ in range(COLD_START_TRIES):  # a version addressed unpromoted starts from zero meanwhile
            out, status, err = await _one(client, target, rows[0][1], spec.max_tokens)
            if status != 503:
                break
        if 400 <= status < 500:
            raise ControlError(status, f"target `{target}`: {err}", "invalid_target", "targets")
        first = score(metrics, out, rows[0][2], err)
        gate = asyncio.Semaphore(spec.concurrency)

        async def one(prompt: list[Any], ref: str) -> Scored:
            async with gate:
                o, _, e = await _one(client, target, prompt, spec.max_tokens)
            return score(metrics, o, ref, e)

        rest = await asyncio.gather(*(one(p, ref) for _, p, ref in rows[1:]))
    return [first, *rest]


def _check(spec: EvalSpec) -> list[Metric]:
    if not 1 <= len(spec.targets) <= 2:
        raise ControlError(400, "give one target, or two to compare", "invalid_targets", "targets")
    if not spec.metrics:
        raise ControlError(400, "give at least one metric", "invalid_metric", "metrics")
    return [parse_metric(m) for m in dict.fromkeys(spec.metrics)]


async def run_eval(ctx: EvalContext, spec: EvalSpec, *, actor: str = "system", job_id: str | None = None,
                   record: bool = True) -> dict[str, Any]:
    """Run one eval (one target, or two side by side) and keep it as an `eval` event; the answer carries the
    outputs and the per-example diff, the event only scores (see control/eval_store.py)."""
    metrics = _check(spec)
    deployments = [ctx.deployment_of(t) for t in spec.targets]
    chosen = await asyncio.to_thread(examples, ctx.datasets, spec.dataset, spec.split, spec.held_out, spec.seed,
                                     min(spec.limit or MAX_EXAMPLES, MAX_EXAMPLES))
    rows = []
    for ex in chosen:
        prompt, ref = prompt_and_reference(ex.messages)
        rows.append((ex, prompt, ref))
    results = {t: await _run_target(ctx, spec, t, rows, metrics) for t in dict.fromkeys(spec.targets)}
    scores = {t: mean_scores(metrics, r) for t, r in results.items()}
    summary: dict[str, Any] = {
        "dataset": spec.dataset, "split": spec.split, "targets": list(results), "metrics": [m.name for m in metrics],
        "examples": len(rows), "scores": scores, "failed": {t: sum(s.output is None for s in r)
                                                             for t, r in results.items()}, "job_id": job_id}
    per = [{"record": ex.record, **{t: results[t][i].scores for t in results}} for i, (ex, _, _) in enumerate(rows)]
    if len(results) == 2:
        a, b = list(results)
        summary["delta"] = delta(scores[a], scores[b])
        summary["disagree"] = [ex.record for i, (ex, _, _) in enumerate(rows) if differs(results[a][i], results[b][i])]
    answer = dict(summary)
    if record:
        stored = {**summary, "per_example": per[:MAX_STORED_EXAMPLES]}
        answer["id"] = await asyncio.to_thread(record_eval, ctx.control.sessions, deployments[0],
                                               _message(summary), actor, **stored)
    answer["data"] = [{"record": ex.record, "reference": ref,
                       **{t: {"output": results[t][i].output, "scores": results[t][i].scores,
                              "error": results[t][i].error} for t in results}}
                      for i, (ex, _, ref) in enumerate(rows)]
    return answer


def _message(summary: dict[str, Any]) -> str:
    parts = [f"{t} " + " ".join(f"{m}={v:.3f}" for m, v in s.items()) for t, s in summary["scores"].items()]
    return f"eval on {summary['dataset']} ({summary['split']}, {summary['examples']} examples): " + "; ".join(parts)
