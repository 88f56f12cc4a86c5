"""LoRA adapters through the gateway: naming, affinity, runtime loading and per-adapter metrics.

Naming (vLLM's way, extended to Ballast's targets): `model` is the adapter's name, with the same
suffixes a deployment takes: `sql` (the production version of the one deployment that serves an adapter
called `sql`), `sql@staging`, `sql:3`. When two deployments serve an adapter of the same name, the
deployment is named first: `chat/sql`, `chat/sql@staging`, `chat/sql:3`. An adapter is served by a version
when its ballast.yaml declares it (`engine.adapters`) or it was loaded at runtime through the gateway.

Affinity: an adapter's requests go to the replica that served it last (bounded load, as prefix routing
does), where it already sits in device slots; runtime-loaded adapters go only to replicas holding them.

`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (admin scope) take vLLM's body plus `model`,
the deployment target (`chat`, `chat@staging`, `chat:3`), and fan out to every ready replica of that
version. Runtime loads live in the replicas: a replica started later has only the declared adapters.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ballast.control.keys import KeyRecord
from ballast.gateway.metering import counts_from_usage
from ballast.gateway.proxy import Outcome
from ballast.gateway.routing import Endpoint
from ballast.observe import REQUEST_ID_HEADER, current_request_id
from ballast.observe.replica_auth import headers_for
from ballast.openai import APIError

if TYPE_CHECKING:
    from ballast.gateway.service import DeploymentRoute, Gateway


def _split_suffix(model: str) -> tuple[str, str]:
    """`sql@staging` → (`sql`, `@staging`); `sql:3` → (`sql`, `:3`)."""
    cut = min((i for i in (model.find("@"), model.find(":")) if i >= 0), default=len(model))
    return model[:cut], model[cut:]


class Adapters:
    def __init__(self, gateway: Gateway, registry: CollectorRegistry):
        self.gw = gateway
        self.loaded: dict[tuple[str, int], dict[str, set[str]]] = {}  # (deployment, version) → adapter → replicas
        self.requests = Counter("ballast_gateway_adapter_requests", "Requests by deployment, LoRA adapter and "
                                "status.", ["deployment", "adapter", "status"], registry=registry)
        self.tokens = Counter("ballast_gateway_adapter_tokens", "Tokens by deployment, LoRA adapter and kind.",
                              ["deployment", "adapter", "kind"], registry=registry)

    # ---- naming ----------------------------------------------------------------------------
    def _served(self, dep: DeploymentRoute, version: int | None = None) -> set[str]:
        versions = [version] if version is not None else list(dep.versions)
        out: set[str] = set()
        for v in versions:
            vr = dep.versions.get(v)
            out |= set(vr.adapters) if vr is not None else set()
            out |= set(self.loaded.get((dep.name, v), {}))
        return out

    def split(self, model: str | None) -> tuple[str | None, str | None]:
        """(the deployment target, the adapter or None) a `model` string names."""
        if not isinstance(model, str):
            return model, None
        name, suffix = _split_suffix(model)
        if "/" in name:
            dep, adapter = name.split("/", 1)
            return dep + suffix, adapter
        if name in self.gw.routes:
            return model, None
        owners = sorted(d.name for d in self.gw.routes.values() if name in self._served(d))
        if len(owners) > 1:
            raise APIError(400, f"the adapter `{name}` is served by {', '.join(owners)}; name one, as in "
                           f"{owners[0]}/{name}", param="model", code="ambiguous_model")
        return (owners[0] + suffix, name) if owners else (model, None)

    def check(self, dep: DeploymentRoute, version: int, adapter: str) -> None:
        if adapter not in self._served(dep, version):
            raise APIError(404, f"version {version} of `{dep.name}` serves no adapter `{adapter}`", param="model",
                           code="model_not_found")

    def endpoints(self, dep: DeploymentRoute, version: int, adapter: str,
                  current: Callable[[], list[Endpoint]]) -> Callable[[], list[Endpoint]]:
        """The replicas that hold a runtime-loaded adapter (all of them for a declared one)."""
        vr = dep.versions.get(version)
        if vr is not None and adapter in vr.adapters:
            return current
        holders = self.loaded.get((dep.name, version), {}).get(adapter, set())
        return lambda: [e for e in current() if e.replica_id in holders]

    def models(self, key: KeyRecord) -> list[dict[str, Any]]:
        return [{"id": a, "object": "model", "created": 0, "owned_by": "ballast", "parent": name}
                for name, dep in sorted(self.gw.routes.items()) if key.may_use(name) for a in sorted(self._served(dep))]

    def observe(self, deployment: str, adapter: str, o: Outcome) -> None:
        counts = counts_from_usage(o.usage, o.error or o.status >= 400)
        self.requests.labels(deployment, adapter, str(o.status)).inc()
        self.tokens.labels(deployment, adapter, "prompt").inc(counts.prompt_tokens)
        self.tokens.labels(deployment, adapter, "completion").inc(counts.completion_tokens)

    # ---- runtime loading (admin) -----------------------------------------------------------
    def routes(self) -> list[tuple[str, Callable[[Request], Any], list[str]]]:
        return [("/v1/load_lora_adapter", self._load, ["POST"]), ("/v1/unload_lora_adapter", self._unload, ["POST"])]

    async def _target(self, request: Request) -> tuple[DeploymentRoute, int, dict[str, Any]]:
        from ballast.gateway.service import _read_body

        key = self.gw.authenticate(request, "admin")
        _, body = await _read_body(request, parse=True)
        if not isinstance(body.get("lora_name"), str):
            raise APIError(400, "`lora_name` (a string) is required", param="lora_name")
        dep, version = self.gw.resolve(body.get("model"), key)
        return dep, version, body

    async def _fan_out(self, dep: DeploymentRoute, version: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
        endpoints = list(dep.versions[version].endpoints)
        if not endpoints:
            raise APIError(503, f"version {version} of `{dep.name}` has no ready replica", code="no_replica_available")
        payload = json.dumps({k: v for k, v in body.items() if k in ("lora_name", "lora_path")}).encode()
        headers = {"content-type": "application/json", REQUEST_ID_HEADER: current_request_id()}

        async def one(ep: Endpoint) -> tuple[str, int, Any]:
            try:
                async with self.gw.proxy.session.post(ep.url + path, data=payload,
                                                      headers={**headers, **headers_for(ep.replica_id)},
                                                      timeout=aiohttp.ClientTimeout(total=120)) as r:
                    return ep.replica_id, r.status, await r.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                return ep.replica_id, 502, {"error": {"message": f"replica unreachable ({type(e).__name__})"}}

        results = await asyncio.gather(*(one(ep) for ep in endpoints))
        return {rid: (status, answer) for rid, status, answer in results}

    @staticmethod
    def _answer(name: str, dep: DeploymentRoute, version: int, results: dict[str, Any], ok: set[int]) -> Response:
        failed = {rid: a for rid, (s, a) in results.items() if s not in ok}
        if failed:
            status, answer = next(iter(results[rid] for rid in failed))
            err = answer.get("error", {}) if isinstance(answer, dict) else {}
            raise APIError(status if 400 <= status < 600 else 502, f"{len(failed)} of {len(results)} replicas "
                           f"refused: {err.get('message', answer)}", param=err.get("param"), code=err.get("code"))
        return JSONResponse({"object": "lora_adapter", "id": name, "deployment": dep.name, "version": version,
                             "replicas": sorted(results)})

    async def _load(self, request: Request) -> Response:
        dep, version, body = await self._target(request)
        results = await self._fan_out(dep, version, "/v1/load_lora_adapter", body)
        name = body["lora_name"]
        held = self.loaded.setdefault((dep.name, version), {}).setdefault(name, set())
        held |= {rid for rid, (s, _) in results.items() if s == 200}
        if not held:
            self.loaded[(dep.name, version)].pop(name, None)
        return self._answer(name, dep, version, results, {200})

    async def _unload(self, request: Request) -> Response:
        dep, version, body = await self._target(request)
        name = body["lora_name"]
        self.loaded.get((dep.name, version), {}).pop(name, None)  # no new requests go there from now on
        results = await self._fan_out(dep, version, "/v1/unload_lora_adapter", body)
        return self._answer(name, dep, version, results, {200, 404})
