"""The floor for bench/runtime.py: a bare Starlette app doing the same echo as examples/echo.

`threadpool` calls the same sync echo function through Starlette's thread pool, as Ballast runs
sync user code; `inline` echoes in the event loop (the absolute floor).
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def echo(inputs: Any) -> Any:
    return {"echo": inputs}


async def threadpool_endpoint(request: Request) -> JSONResponse:
    return JSONResponse(await run_in_threadpool(echo, await request.json()))


async def inline_endpoint(request: Request) -> JSONResponse:
    return JSONResponse(echo(await request.json()))


async def ready(_request: Request) -> JSONResponse:
    return JSONResponse({"status": "ready"})


threadpool = Starlette(routes=[Route("/predict", threadpool_endpoint, methods=["POST"]), Route("/ready", ready)])
inline = Starlette(routes=[Route("/predict", inline_endpoint, methods=["POST"]), Route("/ready", ready)])
