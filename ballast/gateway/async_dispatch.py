"""The async dispatcher: moves queued requests from the store to replicas while they have room.

It runs in the platform process beside the gateway and sends each request through the gateway's own
resolution, routing, proxy and metering (`Gateway.forward`), so async work obeys the same routes,
canaries and retries as synchronous traffic. It takes work for a deployment only while the ready replicas
of the versions it targets carry fewer than `concurrency_target` requests each (synchronous requests
included) and fewer than `async.max_concurrency` async requests run; queued depth is added to the load
the autoscaler reads, so a deployment scaled to zero wakes for queued work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from starlette.responses import Response, StreamingResponse

from ballast.control.async_queue import MAX_RUN_ATTEMPTS, AsyncQueue, Claimed
from ballast.control.keys import KeyRecord
from ballast.control.webhooks import WebhookSender
from ballast.gateway.service import DeploymentRoute, Gateway
from ballast.observe.logging import request_id_var
from ballast.openai import APIError
from ballast.openai.priority import PRIORITY_BATCH, async_priority

log = logging.getLogger("ballast.gateway.async")
MAX_RESULT_BYTES = 32 * 2**20
RETRYABLE_STATUS = (429, 502, 503, 504)  # the request did not run (or may run again safely): queue it again


class _Limited(Exception):
    """A batch line's key is over a limit: put the line back, untried, and leave the key's lines for a while."""

    def __init__(self, retry_after_s: float):
        super().__init__(retry_after_s)
        self.retry_after_s = retry_after_s


def split_target(target: str) -> tuple[str, str | None, int | None]:
    """`chat` -> (chat, production, None); `chat@staging` -> (chat, staging, None); `chat:3` -> (chat, None, 3)."""
    if "@" in target:
        name, env = target.split("@", 1)
        return name, env, None
    name, _, v = target.partition(":")
    return (name, None, int(v)) if v.isdigit() else (name, "production", None)


def target_version(dep: DeploymentRoute, target: str) -> int | None:
    """The version a target sends most of its traffic to (for load and capacity; routing itself splits)."""
    _, env, version = split_target(target)
    if version is not None:
        return version if version in dep.versions else None
    weights = dep.environments.get(env or "production") or []
    return max(weights, key=lambda w: w[1])[0] if weights else None


def queued_deployment(gateway: Gateway, model: object, key: KeyRecord) -> DeploymentRoute:
    """The deployment a submitted target names, refused as `Gateway.resolve` would refuse it, but without taking a
    canary split's turn: the split applies when the request runs, not when it is queued."""
    if not isinstance(model, str) or not model:
        raise APIError(400, "`model` is required: a deployment name (chat, chat@staging, chat:3)", param="model",
                       code="missing_model")
    name, env, version = split_target(model)
    if ":" in model and "@" not in model and version is None:
        raise APIError(400, f"`{model}`: a version is a number, as in {name}:3", param="model")
    dep = gateway.routes.get(name)
    if dep is None:
        raise APIError(404, f"the model `{model}` does not exist", param="model", code="model_not_found")
    if not key.may_use(name):
        raise APIError(403, f"this key may not use deployment `{name}`", param="model", code="deployment_not_allowed")
    if version is not None and version not in dep.versions:
        raise APIError(404, f"deployment `{name}` has no version {version}", param="model", code="model_not_found")
    if env is not None and not dep.environments.get(env):
        raise APIError(404, f"deployment `{name}` has no environment `{env}`", param="model", code="model_not_found")
    return dep


async def _content(resp: Response) -> bytes:
    if isinstance(resp, StreamingResponse):
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.body_iterator:
            b = chunk if isinstance(chunk, bytes) else str(chunk).encode()
            size += len(b)
            if size <= MAX_RESULT_BYTES:
                chunks.append(b)
        return b"".join(chunks)
    return bytes(resp.body)


def _decoded(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace")


def _error_code(decoded: Any) -> object:
    err = decoded.get("error") if isinstance(decoded, dict) else None
    return err.get("code") if isinstance(err, dict) else None


class Dispatcher:
    """Started and stopped with the gateway (a companion); also the autoscaler's LoadSignal."""

    def __init__(self, gateway: Gateway, queue: AsyncQueue, sender: WebhookSender, *, interval_s: float = 0.2):
        self.gateway = gateway
        self.queue = queue
        self.sender = sender
        self.interval_s = interval_s
        self.inflight: dict[str, int] = defaultdict(int)
        self.depths: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._deliveries: asyncio.Task[int] | None = None
        self._wake = asyncio.Event()
        self._housekept = 0.0
        self._renewed = 0.0
        self.limited: dict[str, float] = {}  # key id -> monotonic time its batch lines may run again (over a limit)
        self.chores: list[Callable[[], object]] = []  # blocking store work run about once a second (batches)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        recovered = await asyncio.to_thread(self.queue.recover, True)
        if recovered:
            log.warning("%d async request(s) claimed by a previous run went back to the queue", recovered)
        self._wake = asyncio.Event()
        self._loop_task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        for t in [self._loop_task, self._deliveries, *self._tasks]:
            if t is not None:
                t.cancel()
        await asyncio.gather(*[t for t in [self._loop_task, self._deliveries, *self._tasks] if t is not None],
                             return_exceptions=True)
        # Requests cut short by the shutdown go back to the queue now (this run's only: another may share the store).
        await asyncio.to_thread(self.queue.release)
        await self.sender.aclose()

    def wake(self) -> None:
        self._wake.set()

    # ---- the load signal ---------------------------------------------------------------------
    def load(self) -> dict[tuple[str, int], float]:
        """The gateway's in-flight load plus queued async requests, per (deployment, version)."""
        out = self.gateway.load()
        for target, n in self.depths.items():
            dep = self.gateway.routes.get(split_target(target)[0])
            version = target_version(dep, target) if dep is not None else None
            if dep is not None and version is not None:
                out[(dep.name, version)] = out.get((dep.name, version), 0.0) + n
        return out

    # ---- the loop ----------------------------------------------------------------------------
    async def _loop(self) -> None:
        failing = False
        while True:
            try:
                await self.tick()
                failing = False
            except Exception:
                if not failing:
                    log.exception("the async dispatcher's tick failed; retrying")
                failing = True
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def tick(self) -> None:
        now = time.monotonic()
        if now - self._housekept >= 1.0:
            self._housekept = now
            await asyncio.to_thread(self.queue.expire_due)
            if now - self._renewed >= self.queue.lease_s / 3:
                self._renewed = now
                await asyncio.to_thread(self.queue.renew)
            if await asyncio.to_thread(self.queue.recover):
                log.warning("async request(s) whose dispatcher stopped renewing its claim went back to the queue")
            await asyncio.to_thread(self.queue.sweep_results)
            for chore in self.chores:
                await asyncio.to_thread(chore)
        if self._deliveries is None or self._deliveries.done():
            self._deliveries = asyncio.create_task(self.sender.run_due())
        self.depths = await asyncio.to_thread(self.queue.depths)
        by_deployment: dict[str, list[str]] = defaultdict(list)
        for target in self.depths:
            by_deployment[split_target(target)[0]].append(target)
        for name, targets in by_deployment.items():
            room = self._room(name, targets)
            if room <= 0:
                continue
            now = time.monotonic()
            self.limited = {k: t for k, t in self.limited.items() if t > now}
            for c in await asyncio.to_thread(self.queue.claim, name, room, set(self.limited)):
                self.inflight[name] += 1
                task = asyncio.create_task(self._run(c))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _room(self, name: str, targets: list[str]) -> int:
        """How many more async requests the deployment's replicas can take now."""
        dep = self.gateway.routes.get(name)
        if dep is None:
            return 1  # deleted: claim one at a time so each fails with the gateway's 404
        free_async = dep.async_policy.max_concurrency - self.inflight[name]
        per_replica = max(1, math.ceil(dep.concurrency_target))
        spare = 0
        for version in {target_version(dep, t) for t in targets}:
            if version is None:
                return min(1, free_async)  # no such environment/version: let it fail with the gateway's error
            endpoints = dep.versions[version].endpoints if version in dep.versions else []
            if not endpoints:
                self.gateway.source.request_capacity(name, version)  # scale from zero
                continue
            spare += len(endpoints) * per_replica - sum(ep.outstanding for ep in endpoints)
        return min(spare, free_async)

    async def _run(self, c: Claimed) -> None:
        try:
            outcome = await self._call(c)
        except asyncio.CancelledError:
            self.inflight[c.deployment] -= 1
            raise
        except _Limited as e:
            self.inflight[c.deployment] -= 1
            self.limited[c.key_id] = time.monotonic() + e.retry_after_s
            await asyncio.to_thread(self.queue.requeue, c.id, False)
            return
        except Exception as e:
            log.exception("async request %s failed in the dispatcher", c.id)
            outcome = (False, None, None, [{"code": "internal_error", "message": type(e).__name__}])
        self.inflight[c.deployment] -= 1
        ok, version, result, errors = outcome
        if ok is None:
            await asyncio.to_thread(self.queue.requeue, c.id)
        else:
            policy = self.gateway.routes[c.deployment].async_policy if c.deployment in self.gateway.routes else None
            await asyncio.to_thread(self.queue.finish, c.id, ok=ok, version=version, result=result, errors=errors,
                                    result_ttl_s=policy.result_ttl_s if policy else 0.0)
        self._wake.set()  # room for the next request, and a webhook to send: the next tick now, not in interval_s

    async def _call(self, c: Claimed) -> tuple[bool | None, int | None, dict[str, Any] | None, list[dict[str, Any]]]:
        """(ok, version, {status, body}, errors); ok None: not run, queue it again."""
        key = next((k for k in self.gateway.keys.values() if k.id == c.key_id), None)
        if key is None:
            return False, None, None, [{"code": "invalid_api_key", "message": "the key that submitted the request "
                                        "was revoked"}]
        limiter = self.gateway.limiters.get(key.id)
        if c.batch_id is not None and limiter is not None:
            # Batch lines were not admitted one by one at submission: the key's limits apply as each one runs.
            try:
                await self.gateway.shared.admit(limiter)
            except APIError as e:
                raise _Limited(float(e.headers.get("Retry-After", "5"))) from None
        body_obj = c.payload.get("body")
        version: int | None = None
        try:
            dep, version = self.gateway.resolve(c.target, key)
            parsed = dict(body_obj) if c.kind != "predict" and isinstance(body_obj, dict) else None
            # In the replica's engine, interactive traffic (0) goes first, then async (1..3), then batch lines (4).
            priority = PRIORITY_BATCH if c.batch_id is not None else async_priority(c.priority)
            # Its own request id (in logs, and the engine's id for it): this task runs outside any HTTP request.
            request_id_var.set(f"{c.id}.{c.attempts}")
            resp = await self.gateway.forward(key, c.kind, f"{dep.name}:{version}", json.dumps(body_obj).encode(),
                                              parsed, None, time.monotonic(), admit=False, priority=priority)
            status, content = resp.status_code, await _content(resp)
        except APIError as e:
            if e.status in RETRYABLE_STATUS and c.attempts < MAX_RUN_ATTEMPTS:
                return None, version, None, []
            return False, version, None, [{"code": e.code or "error", "message": e.message}]
        decoded = _decoded(content)
        if status == 429 and _error_code(decoded) == "queue_full":
            # The replica's queue had no place for it, or gave its place to interactive work: it did not run.
            raise _Limited(float(resp.headers.get("retry-after") or 1))
        if status in RETRYABLE_STATUS and c.attempts < MAX_RUN_ATTEMPTS:
            return None, version, None, []
        result = {"status": status, "body": decoded}
        if status >= 400:
            err = decoded.get("error") if isinstance(decoded, dict) else None
            message = err.get("message") if isinstance(err, dict) else str(decoded)[:500]
            code = err.get("code") if isinstance(err, dict) else None
            return False, version, result, [{"code": code or f"http_{status}", "message": message}]
        return True, version, result, []
