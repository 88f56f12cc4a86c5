"""REST routes for evals and the adapter gate (admin keys): `POST /api/v1/evals` runs one and answers with its
scores, outputs and diff; `GET /api/v1/evals` and `GET /api/v1/evals/{id}` read the kept results (scores only);
`POST /api/v1/adapters/ship` runs the gate on an adapter directory of the platform's machine (loopback only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from ballast.control.eval_store import list_evals, show_eval
from ballast.observe import is_loopback
from ballast.openai import APIError
from ballast.platform.adapter_gate import ship_adapter
from ballast.platform.auth import Actor
from ballast.platform.canary_guard import GuardLimits
from ballast.platform.datasets_api import DATASET
from ballast.platform.evals import EvalContext, EvalSpec, run_eval
from ballast.platform.openapi import CheckedJSONRoute, errors
from ballast.platform.schemas import INT32, NAME, SERVER_PATH

METRIC = Field(min_length=1, max_length=520, pattern=r"^(exact|contains|prefix|json_valid|token_f1|regex:.+)$")
TARGET = Field(min_length=1, max_length=140, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]*$")


class EvalRequest(BaseModel):
    targets: list[Annotated[str, TARGET]] = Field(min_length=1, max_length=2, description="One target (`chat`, "
                                                  "`chat:3`, `chat@prod`, `chat/sql`, `sql`), or two to compare.")
    dataset: str = Field(pattern=DATASET, max_length=63)
    split: str = Field("heldout", pattern=r"^(heldout|held_out|train|all)$")
    metrics: list[Annotated[str, METRIC]] = Field(
        ["exact"], min_length=1, max_length=8, description="exact, contains, prefix, json_valid, token_f1, regex:P.")
    limit: int | None = Field(None, ge=1, le=5000)
    held_out: float = Field(0.2, ge=0, le=1, description="The held-out share (the same seeded split as export).")
    seed: int = Field(0, ge=0, le=INT32)
    max_tokens: int = Field(64, ge=1, le=4096)
    concurrency: int = Field(4, ge=1, le=64)


class ShipRequest(BaseModel):
    deployment: str = Field(pattern=NAME, max_length=63)
    adapter_path: str = SERVER_PATH
    adapter_name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    dataset: str = Field(pattern=DATASET, max_length=63)
    metric: Annotated[str, METRIC] = "exact"
    margin: float = Field(0.0, ge=-1, le=1)
    env: str = Field("production", pattern=NAME)
    canary_percent: int = Field(10, ge=1, le=99)
    hold_s: float = Field(60.0, ge=0, le=86400)
    job_id: str | None = Field(None, max_length=64)
    max_tokens: int = Field(64, ge=1, le=4096)
    concurrency: int = Field(4, ge=1, le=64)
    max_error_rate_delta: float = Field(0.05, ge=0, le=1, description="The canary's error rate may exceed the "
                                        "stable version's by this much.")
    max_latency_ratio: float = Field(2.0, gt=0, le=1000, description="... and its mean latency the stable's times "
                                     "this, plus latency_slack_s.")
    latency_slack_s: float = Field(0.05, ge=0, le=3600)


def router(ctx: EvalContext) -> APIRouter:
    api = APIRouter(prefix="/api/v1", route_class=CheckedJSONRoute, tags=["evals"])

    @api.post("/evals", responses=errors(400, 404))
    async def create_eval(body: EvalRequest, who: Actor) -> dict[str, Any]:
        """Run a dataset through one or two targets via the gateway (batch priority, greedy) and score it."""
        spec = EvalSpec(**body.model_dump())
        return await run_eval(ctx, spec, actor=who)

    @api.get("/evals")
    def get_evals(_who: Actor, limit: Annotated[int, Query(ge=1, le=1000)] = 50,
                  deployment: Annotated[str | None, Query(pattern=NAME, max_length=63)] = None) -> dict[str, Any]:
        """Kept eval results, newest first (scores and counts; no text)."""
        return {"data": list_evals(ctx.control.sessions, limit, deployment)}

    @api.get("/evals/{eval_id}", responses=errors(404))
    def get_eval(eval_id: Annotated[int, PathParam(ge=1, le=2**53)], _who: Actor) -> dict[str, Any]:
        """One kept eval, with each example's dataset record id and scores."""
        return show_eval(ctx.control.sessions, eval_id)

    @api.post("/adapters/ship", responses=errors(400, 404))
    async def ship(body: ShipRequest, request: Request, who: Actor) -> dict[str, Any]:
        """Evaluate an adapter against production; a win by `margin` ships it as a canary (a guard promotes it
        after `hold_s`, or rolls it back). The adapter directory must be on the platform's machine."""
        client = request.client.host if request.client else None
        if not is_loopback(client):
            raise APIError(403, "an adapter path on the platform's machine is accepted only from that machine",
                           code="server_path_forbidden", param="adapter_path")
        gate = await ship_adapter(ctx, deployment=body.deployment, env=body.env, adapter_dir=Path(body.adapter_path),
                                  adapter_name=body.adapter_name, dataset=body.dataset, metric=body.metric,
                                  margin=body.margin, canary_percent=body.canary_percent, hold_s=body.hold_s,
                                  job_id=body.job_id, actor=who, max_tokens=body.max_tokens,
                                  concurrency=body.concurrency,
                                  limits=GuardLimits(body.max_error_rate_delta, body.max_latency_ratio,
                                                     body.latency_slack_s))
        return gate.to_dict()

    return api
