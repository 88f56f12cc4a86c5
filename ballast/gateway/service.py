"""The gateway: one OpenAI-compatible endpoint in front of every deployment.

Hot path per request: key lookup (a dict), limits (in-memory buckets; with Redis, one script), target resolution,
replica choice, proxy. No database round trip: keys and routes are snapshots that the control plane
refreshes (`GatewaySource`), usage is written in batches by the `Meter`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ballast.control.async_queue import AsyncPolicy
from ballast.control.keys import KeyRecord
from ballast.gateway import spans
from ballast.gateway.adapters import Adapters
from ballast.gateway.auth import MISSING_KEY_MESSAGE, api_key_from_headers
from ballast.gateway.body import MAX_BODY as MAX_BODY  # where batches.py finds it
from ballast.gateway.body import _read_body
from ballast.gateway.capture import Capture, CapturePolicy
from ballast.gateway.limits import KeyLimiter, LocalState
from ballast.gateway.metering import Meter, UsageCounts, UsageKey, counts_from_usage
from ballast.gateway.metrics import GatewayMetrics
from ballast.gateway.proxy import Outcome, Proxy, resume_plan
from ballast.gateway.routing import Endpoint, Router, WeightedSplit
from ballast.gateway.targets import affinity_key, model_of_path, parse_model, rewrite_body
from ballast.observe import REQUEST_ID_HEADER, current_request_id
from ballast.observe.tracing import current_span
from ballast.openai import APIError
from ballast.openai.priority import PRIORITY_HEADER
from ballast.store import hash_key

log = logging.getLogger("ballast.gateway")

INFERENCE_PATHS = {"chat_completions": "/v1/chat/completions", "completions": "/v1/completions",
                   "embeddings": "/v1/embeddings", "responses": "/v1/responses", "predict": "/predict"}


@dataclass
class VersionRoute:
    version: int
    endpoints: list[Endpoint] = field(default_factory=list)
    model_name: str | None = None  # the name its replicas answer to; `model` is rewritten to it on the way
    adapters: frozenset[str] = frozenset()  # LoRA adapters its ballast.yaml declares (gateway/adapters.py)


@dataclass
class DeploymentRoute:
    name: str
    llm: bool
    versions: dict[int, VersionRoute]
    environments: dict[str, list[tuple[int, int]]]  # env -> [(version, weight percent)]
    prefix_routing: bool = False  # route by prompt prefix (KV-cache affinity) rather than least outstanding
    max_queue: int = 256  # requests held while no replica is ready
    max_wait_s: float = 120.0
    async_policy: AsyncPolicy = field(default_factory=AsyncPolicy)  # the `async:` section
    concurrency_target: float = 1.0  # in-flight requests per replica the async dispatcher fills up to
    capture: CapturePolicy | None = None  # the `capture:` section (gateway/capture.py)
    migration_limit: int = 3  # mid-stream resumes allowed per stream (gateway/resume.py)


class GatewaySource(Protocol):
    """What the gateway needs from the control plane (same process: plain method calls)."""

    def snapshot(self) -> tuple[list[KeyRecord], dict[str, DeploymentRoute]]: ...

    def generation(self) -> int:
        """Goes up after every committed routing change; a gateway behind it refreshes before routing."""

    async def write_usage(self, batch: dict[UsageKey, UsageCounts]) -> None: ...

    def request_capacity(self, deployment: str, version: int) -> None:
        """A request is waiting for a version with no ready replica: scale it up from zero."""


class Gateway:
    def __init__(self, source: GatewaySource, registry: CollectorRegistry, *, refresh_s: float = 0.25):
        self.source = source
        self.router = Router()
        self.metrics = GatewayMetrics(registry)
        self.proxy = Proxy(self.router, on_retry=lambda ep: self.metrics.retries.labels(ep.meta.get("d", "")).inc(),
                           on_eject=lambda ep: self.metrics.ejections.labels(ep.meta.get("d", "")).inc(),
                           on_resume=lambda ep: self.metrics.stream_resumed.labels(ep.meta.get("d", "")).inc())
        self.meter = Meter(source.write_usage)
        self.refresh_s = refresh_s
        self.keys: dict[str, KeyRecord] = {}
        self.routes: dict[str, DeploymentRoute] = {}
        self.limiters: dict[str, KeyLimiter] = {}
        self.shared = LocalState()  # limits and prefix affinity; gateway/shared.py shares them through Redis
        self._splits: dict[tuple[str, str], tuple[tuple[tuple[int, int], ...], WeightedSplit]] = {}
        self._held: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._generation = -1  # of the snapshot applied last
        self._refreshing = asyncio.Lock()
        # Companions started and stopped with the gateway, and the routes they add (the async dispatcher).
        self.companions: list[Any] = []
        self.extra_routes: list[tuple[str, Callable[[Request], Awaitable[Response]], list[str]]] = []
        self.adapters = Adapters(self, registry)
        self.capture: Capture | None = None  # opt-in traffic capture, installed by the platform
        self.extra_routes += self.adapters.routes()

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._generation = self.source.generation()
        self.refresh()
        self.meter.start()
        self._task = asyncio.create_task(self._refresh_loop())
        for c in self.companions:
            await c.start()

    async def stop(self) -> None:
        for c in reversed(self.companions):
            await c.stop()
        if self._task:
            self._task.cancel()
        await self.meter.stop()
        await self.proxy.aclose()

    async def _refresh_loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh_now()
                failing = False
            except Exception:
                if not failing:
                    log.exception("refreshing the gateway's routes failed; keeping the last good snapshot")
                failing = True

    def refresh(self) -> None:
        self.apply(*self.source.snapshot())

    async def refresh_now(self) -> None:
        """Apply the latest snapshot now (after a key was created or revoked through this process). The
        snapshot reads the store off the event loop; the generation is taken before it, so a change
        committed during the read is caught by the next check."""
        async with self._refreshing:
            generation = self.source.generation()
            self.apply(*await asyncio.to_thread(self.source.snapshot))
            self._generation = generation

    async def _catch_up(self) -> None:
        """A routing change committed since the last snapshot: route by it, not by what it replaced."""
        async with self._refreshing:
            if self.source.generation() == self._generation:
                return  # another request's refresh covered it while this one waited
        await self.refresh_now()

    def apply(self, keys: list[KeyRecord], routes: dict[str, DeploymentRoute]) -> None:
        """Swap in the control plane's latest keys and routes, keeping live endpoint state."""
        self.keys = {k.key_hash: k for k in keys}
        for k in keys:
            lim = self.limiters.get(k.id)
            if lim is None or lim.limits != k.limits:
                self.limiters[k.id] = KeyLimiter(k)
            else:
                lim.used_in_period = max(lim.used_in_period, k.used_in_period)
        old = {ep.replica_id: ep for d in self.routes.values() for v in d.versions.values() for ep in v.endpoints}
        for d in routes.values():
            for v in d.versions.values():
                fresh = []
                for ep in v.endpoints:
                    prev = old.get(ep.replica_id)
                    if prev is not None and prev.url == ep.url:
                        ep = prev
                    ep.meta["d"] = d.name
                    fresh.append(ep)
                v.endpoints = fresh
        self.routes = routes
        self._changed.set()
        self._changed = asyncio.Event()

    # ---- load signal for the autoscaler ------------------------------------------------------
    def load(self) -> dict[tuple[str, int], float]:
        """In-flight requests per (deployment, version), held requests included."""
        out: dict[tuple[str, int], float] = {}
        for d in self.routes.values():
            for v in d.versions.values():
                out[(d.name, v.version)] = float(sum(ep.outstanding for ep in v.endpoints))
        for name, held in self._held.items():
            dep, _, ver = name.partition("#")
            out[(dep, int(ver))] = out.get((dep, int(ver)), 0.0) + held
        return out

    # ---- auth ------------------------------------------------------------------------------
    def authenticate(self, request: Request, scope: str) -> KeyRecord:
        secret = api_key_from_headers(request.headers)
        if not secret:
            raise APIError(401, MISSING_KEY_MESSAGE, code="missing_api_key")
        key = self.keys.get(hash_key(secret))
        if key is None:
            raise APIError(401, "invalid API key (it may have been revoked)", code="invalid_api_key")
        if scope not in key.scopes and "admin" not in key.scopes:
            raise APIError(403, f"this key lacks the `{scope}` scope", code="insufficient_scope")
        return key

    # ---- resolution ------------------------------------------------------------------------
    def resolve(self, model: str | None, key: KeyRecord) -> tuple[DeploymentRoute, int]:
        """The deployment and version a `model` string names, for this key."""
        name, env, version = parse_model(model)
        dep = self.routes.get(name)
        if dep is None:
            raise APIError(404, f"the model `{model}` does not exist", param="model", code="model_not_found")
        if not key.may_use(name):
            raise APIError(403, f"this key may not use deployment `{name}`", param="model",
                           code="deployment_not_allowed")
        if version is None:
            return dep, self._environment_version(dep, name, env)
        if version not in dep.versions:
            raise APIError(404, f"deployment `{name}` has no version {version}", param="model",
                           code="model_not_found")
        return dep, version

    def _environment_version(self, dep: DeploymentRoute, name: str, env: str) -> int:
        """The version an environment sends this request to (canary splits by smooth weighted round robin)."""
        weights = dep.environments.get(env)
        if not weights:
            raise APIError(404, f"deployment `{name}` has no environment `{env}`", param="model",
                           code="model_not_found")
        if len(weights) == 1:
            return weights[0][0]
        sig = tuple(weights)
        cached = self._splits.get((name, env))
        if cached is None or cached[0] != sig:
            cached = (sig, WeightedSplit(weights))
            self._splits[(name, env)] = cached
        return cached[1].next()

    # ---- requests --------------------------------------------------------------------------
    async def _endpoints(self, dep: DeploymentRoute, version: int) -> Callable[[], list[Endpoint]]:
        """Ready endpoints of a version; holds the request (bounded) while a replica cold-starts."""

        def current() -> list[Endpoint]:
            d = self.routes.get(dep.name)
            v = d.versions.get(version) if d else None
            return v.endpoints if v else []

        if current():
            return current
        slot = f"{dep.name}#{version}"
        held = self._held.get(slot, 0)
        if held >= dep.max_queue:
            raise APIError(429, f"too many requests are waiting for `{dep.name}` to start", code="queue_full",
                           headers={"Retry-After": "2"})
        self._held[slot] = held + 1
        self.metrics.queued.labels(dep.name).set(self._held[slot])
        started = time.monotonic()
        deadline = started + dep.max_wait_s
        try:
            self.source.request_capacity(dep.name, version)
            while not current():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise APIError(503, f"no replica of `{dep.name}` became ready within {dep.max_wait_s:g}s; "
                                   "retry later", code="no_replica_available", headers={"Retry-After": "5"})
                try:
                    await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))
                except TimeoutError:
                    self.source.request_capacity(dep.name, version)
            self.metrics.cold_waits.labels(dep.name).observe(time.monotonic() - started)
            return current
        finally:
            self._held[slot] -= 1
            self.metrics.queued.labels(dep.name).set(self._held[slot])

    async def handle(self, request: Request, kind: str, model: str | None = None) -> Response:
        started = time.monotonic()
        if self.source.generation() != self._generation:
            await self._catch_up()
        key = self.authenticate(request, "inference")
        body, parsed = await _read_body(request, parse=kind != "predict" or model is None)
        if parsed is not None:
            model = parsed.get("model")
        wanted = self.capture.requested(request, key) if self.capture is not None else None
        resp = await self.forward(key, kind, model, body, parsed, request.headers.get("x-ballast-session"), started)
        return await self.capture.record(kind, key, model, parsed, resp, wanted) if self.capture is not None else resp

    async def forward(self, key: KeyRecord, kind: str, model: str | None, body: bytes, parsed: Any,
                      session: str | None, started: float, admit: bool = True, priority: int | None = None,
                      resend: bool = True) -> Response:
        """Resolve, admit (unless the caller was admitted already: async requests are, at submission), route,
        proxy and meter one authenticated request. `priority` (queued work only) goes to the replica's engine as
        x-ballast-priority; interactive requests send none, so the engine runs them first (0), and a client's
        own x-ballast-priority header is not passed on: queued work's priority is the platform's to set."""
        target, adapter = self.adapters.split(model)
        dep, version = self.resolve(target, key)
        if adapter:
            self.adapters.check(dep, version, adapter)
        limiter = self.limiters.get(key.id)
        is_llm_call = kind != "predict"  # an adapter's key: where it sits in device slots already (bounded load)
        prefix = b"a:" + adapter.encode() if adapter else affinity_key(dep.prefix_routing and is_llm_call, parsed,
                                                                        session)
        await self.shared.admit(limiter if admit else None, self.router, prefix)  # and learn where `prefix` went
        endpoints = await self._endpoints(dep, version)
        if adapter:
            endpoints = self.adapters.endpoints(dep, version, adapter, endpoints)
        headers = {"content-type": "application/json", REQUEST_ID_HEADER: current_request_id()}
        if priority is not None:
            headers[PRIORITY_HEADER] = str(priority)
        served = adapter or (dep.versions[version].model_name if is_llm_call else None)
        body, strip_usage = rewrite_body(body, parsed, kind, served)
        resume = resume_plan(kind, parsed, dep.llm, dep.migration_limit, headers)
        span = current_span()
        traced = (span, spans.on_route(span, kind, model, dep.name, version, headers)) if span is not None else None

        def done(o: Outcome) -> None:
            self._finished(o, key, dep.name, version, limiter, started, traced)
            if adapter:
                self.adapters.observe(dep.name, adapter, o)

        return await self.proxy.forward(
            endpoints, INFERENCE_PATHS[kind], body, headers, key=prefix, outcome=Outcome(), on_done=done,
            extract_usage=is_llm_call, strip_usage=strip_usage, resend=resend, resume=resume,
        )

    def _finished(self, o: Outcome, key: KeyRecord, deployment: str, version: int, limiter: KeyLimiter | None,
                  started: float, traced: tuple[Any, dict[str, Any]] | None = None) -> None:
        """A request is over (answer relayed, or failed): metrics, metering, and the key's token bucket."""
        m = self.metrics
        m.requests.labels(deployment, str(version), str(o.status)).inc()
        m.latency.labels(deployment).observe(time.monotonic() - started)
        counts = counts_from_usage(o.usage, o.error or o.status >= 400)
        if o.first_chunk_s is not None:
            m.ttft.labels(deployment).observe(o.first_chunk_s)
            if o.stream_s is not None and counts.completion_tokens > 1:
                m.itl.labels(deployment).observe(o.stream_s / (counts.completion_tokens - 1))
        if counts.prompt_tokens or counts.completion_tokens:
            m.tokens.labels(deployment, "prompt").inc(counts.prompt_tokens)
            m.tokens.labels(deployment, "completion").inc(counts.completion_tokens)
        self.meter.record(key.id, deployment, version, counts)
        if traced is not None:
            spans.on_done(*traced, o, counts)
        self.shared.finished(limiter, deployment, version, counts.prompt_tokens + counts.completion_tokens)

    def models_for(self, request: Request) -> Response:
        key = self.authenticate(request, "inference")
        data = []
        for name, dep in sorted(self.routes.items()):
            if not key.may_use(name):
                continue
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "ballast"})
            for env in sorted(dep.environments):
                if env != "production":
                    data.append({"id": f"{name}@{env}", "object": "model", "created": 0, "owned_by": "ballast"})
        data += self.adapters.models(key)
        return JSONResponse({"object": "list", "data": data})

    def routes_for_app(self) -> list[tuple[str, Callable[[Request], Awaitable[Response]], list[str]]]:
        """Routes to mount on the platform app."""

        def openai_route(kind: str) -> Callable[[Request], Awaitable[Response]]:
            async def h(request: Request) -> Response:
                return await self.handle(request, kind)

            return h

        async def models(request: Request) -> Response:
            return self.models_for(request)

        async def predict(request: Request) -> Response:
            return await self.handle(request, "predict", model_of_path(request.path_params))

        return [
            ("/v1/chat/completions", openai_route("chat_completions"), ["POST"]),
            ("/v1/completions", openai_route("completions"), ["POST"]),
            ("/v1/embeddings", openai_route("embeddings"), ["POST"]),
            ("/v1/responses", openai_route("responses"), ["POST"]),
            ("/v1/models", models, ["GET"]),
            ("/deployments/{name}/predict", predict, ["POST"]),
            ("/deployments/{name}/environments/{env}/predict", predict, ["POST"]),
            ("/deployments/{name}/versions/{version:int}/predict", predict, ["POST"]),
            *self.extra_routes,
        ]
