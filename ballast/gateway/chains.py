"""`/chains/{name}/run` (and its environment and version forms): a chain's entry behind the gateway.

The chain's name resolves (in memory, re-read only after a routing change) to its entry step's deployment and
the version the chain version pins; the request then goes through `Gateway.forward` like a predict request to
that version, so keys, limits, metering and retries are the same. The body becomes the hop envelope: the
request id, the caller's deadline (`x-ballast-deadline`) and one trace id (from `traceparent` or
`x-ballast-trace`, else new) travel to every step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ballast.control.chains import ChainTarget
from ballast.gateway.service import Gateway, _read_body
from ballast.observe import current_request_id
from ballast.observe.hops import (
    DEADLINE_HEADER,
    ENVELOPE,
    IDEMPOTENT_HEADER,
    TRACE_HEADER,
    new_trace_id,
    trace_id_of,
)
from ballast.observe.replica_auth import token_for
from ballast.openai import APIError

Route = tuple[str, Callable[[Request], Awaitable[Response]], list[str]]


def _deadline(request: Request) -> float | None:
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value < 1e6:
        raise APIError(400, f"{DEADLINE_HEADER} must be a number of seconds above 0", param=DEADLINE_HEADER,
                       code="invalid_deadline")
    return value


class ChainRoutes:
    def __init__(self, gateway: Gateway, read: Callable[[], dict[str, ChainTarget]],
                 current_key: Callable[[str, str], str | None] | None = None) -> None:
        self.gateway = gateway
        self.read = read
        self.current_key = current_key
        self.targets: dict[str, ChainTarget] = {}
        self._generation = -1
        self._lock = asyncio.Lock()

    async def _current(self) -> dict[str, ChainTarget]:
        """The chains' targets, re-read after a routing change (a promote moves the generation)."""
        gen = self.gateway.source.generation()
        if gen != self._generation:
            async with self._lock:
                if gen != self._generation:
                    self.targets = await asyncio.to_thread(self.read)
                    self._generation = gen
        return self.targets

    async def _resolve(self, params: dict[str, Any]) -> str:
        name = str(params["name"])
        chain = (await self._current()).get(name)
        if chain is None:
            raise APIError(404, f"the chain `{name}` does not exist", param="name", code="chain_not_found")
        if "step" in params:  # a call between steps: the version is the one the calling step pins
            if params["step"] not in chain.steps:
                raise APIError(404, f"chain `{name}` has no step `{params['step']}`", param="step",
                               code="chain_not_found")
            return f"{params['step']}:{params['version']}"
        if "version" in params:
            number: int | None = int(params["version"])
            target, where = chain.versions.get(int(params["version"])), f"version {params['version']}"
        else:
            env = str(params.get("env", "production"))
            target, where = chain.environments.get(env), f"environment `{env}`"
            number = chain.env_versions.get(env)
        if target is None:
            raise APIError(404, f"chain `{name}` has no {where}", param="name", code="chain_not_found")
        if number in chain.broken:
            missing = chain.broken[number]
            raise APIError(409, f"chain `{name}` version {number} is broken: its step {', '.join(missing)} was "
                           "deleted; deploy the chain again", param=missing[0], code="chain_broken")
        return f"{target[0]}:{target[1]}"

    async def run(self, request: Request) -> Response:
        started = time.monotonic()
        gw = self.gateway
        if gw.source.generation() != gw._generation:
            await gw._catch_up()
        key = gw.authenticate(request, "inference")
        model = await self._resolve(dict(request.path_params))
        deadline = _deadline(request)
        _, inputs = await _read_body(request, parse=True)
        trace = trace_id_of(request.headers) or new_trace_id()
        meta = {"request_id": current_request_id(), "deadline_s": deadline, "trace_id": trace}
        if ENVELOPE in inputs:  # the caller speaks the hop protocol itself: keep its values, add what is missing
            given = inputs[ENVELOPE] if isinstance(inputs[ENVELOPE], dict) else {}
            meta.update({k: v for k, v in given.items() if v is not None and k in meta})
            inputs = inputs.get("inputs", {})
        body = json.dumps({ENVELOPE: meta, "inputs": inputs}).encode()
        # A call between steps says whether the step may run twice; a client's call to the entry is a predict.
        resend = "step" not in request.path_params or request.headers.get(IDEMPOTENT_HEADER) == "true"
        work = gw.forward(key, "predict", model, body, None, request.headers.get("x-ballast-session"), started,
                          resend=resend)
        response = await _unless_disconnected(work, request)
        response.headers[TRACE_HEADER] = str(meta["trace_id"])
        return response

    async def internal_key(self, request: Request) -> Response:
        """A step replica asks for its chain's current internal key with the key it holds (current, or rotated
        and still in its grace); any other key is refused. Not cached: it is asked rarely."""
        gw = self.gateway
        if gw.source.generation() != gw._generation:
            await gw._catch_up()
        key = gw.authenticate(request, "inference")
        name = str(request.path_params["name"])
        secret = await asyncio.to_thread(self.current_key, name, key.id) if self.current_key else None
        if secret is None:
            raise APIError(403, f"only chain `{name}`'s own internal key may ask for it", code="not_a_chain_key")
        return JSONResponse({"key": secret}, headers={"Cache-Control": "no-store"})

    async def replicas(self, request: Request) -> Response:
        """The ready replicas of a chain's step version, for calls between steps that go straight to them (the
        gateway's own routing view: ejected replicas left out). Only a key allowed the step may ask."""
        gw = self.gateway
        if gw.source.generation() != gw._generation:
            await gw._catch_up()
        key = gw.authenticate(request, "inference")
        params = dict(request.path_params)
        await self._resolve(params)  # the chain and the step exist
        step, version = str(params["step"]), int(params["version"])
        if not key.may_use(step):
            raise APIError(403, f"this key may not use deployment `{step}`", code="deployment_not_allowed")
        dep = gw.routes.get(step)
        v = dep.versions.get(version) if dep is not None else None
        now = time.monotonic()
        ready = [ep for ep in (v.endpoints if v is not None else []) if ep.available(now)]
        # A Ray replica answers only with its token (observe.replica_auth): the chain's steps get them, as they
        # are this chain's own replicas and the caller holds the chain's key.
        tokens = [token_for(ep.replica_id) for ep in ready]
        return JSONResponse({"replicas": [ep.url for ep in ready], "tokens": tokens})

    def routes(self) -> list[Route]:
        return [*[(path, self.run, ["POST"]) for path in (
            "/chains/{name}/run", "/chains/{name}/environments/{env}/run", "/chains/{name}/versions/{version:int}/run",
            "/chains/{name}/steps/{step}/versions/{version:int}/run")],
            ("/chains/{name}/internal-key", self.internal_key, ["GET"]),
            ("/chains/{name}/steps/{step}/versions/{version:int}/replicas", self.replicas, ["GET"])]


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (its body has been read, so only a disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(work: Awaitable[Response], request: Request) -> Response:
    """Run the forward, cancelling it when the client disconnects: the replica sees its connection close and
    cancels the step, whose own calls to other steps close in turn, so a cancelled client cancels the tree."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Response(status_code=499)  # nobody is listening; for the logs and metrics only
