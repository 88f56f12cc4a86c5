"""REST route of the metrics history: `GET /api/v1/deployments/{name}/metrics?range=15m|1h|24h|7d`."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from ballast.control.metrics_history import MetricsHistory
from ballast.platform.auth import Actor
from ballast.platform.openapi import CheckedJSONRoute, errors
from ballast.platform.schemas import NAME


def router(history: MetricsHistory) -> APIRouter:
    api = APIRouter(prefix="/api/v1", route_class=CheckedJSONRoute, tags=["metrics"])

    @api.get("/deployments/{name}/metrics", responses=errors(404))
    async def metrics(name: Annotated[str, PathParam(pattern=NAME, max_length=63)], _who: Actor,
                      range: Literal["15m", "1h", "24h", "7d"] = "1h") -> dict[str, Any]:
        """The deployment's metrics history: `t` (bucket starts, Unix seconds) and one list per series
        (requests/s by status class, error rate, latency, TTFT and inter-token p50/p95/p99, tokens/s, replicas,
        held queue, KV-cache use, prefix-cache hit rate, cold starts), oldest first; null where nothing was
        measured. 10 s buckets for 15m and 1h, 5 min buckets for 24h and 7d."""
        return await run_in_threadpool(history.query, name, range, time.time())

    return api
