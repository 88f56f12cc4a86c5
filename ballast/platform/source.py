"""The gateway's view of the control plane: keys and routes read from the store, usage written back.

`snapshot()` runs every refresh (a quarter of a second) in a worker thread: a handful of small queries,
never one per request. Version configs are immutable (dev versions change with their revision), so
their routing settings are parsed once per (version, revision).
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select

from ballast.control import ControlPlane, Reconciler, env_traffic
from ballast.control.keys import KeyStore
from ballast.gateway.metering import UsageCounts, UsageKey
from ballast.gateway.routing import Endpoint
from ballast.gateway.service import DeploymentRoute, KeyInfo, VersionRoute
from ballast.store import Deployment, Environment, Replica, Version


class StoreSource:
    def __init__(self, control: ControlPlane, reconciler: Reconciler | None = None):
        self.control = control
        self.reconciler = reconciler
        self.keys = KeyStore(control.sessions)
        self._settings: dict[tuple[int, int], tuple[bool, bool, int, float, str]] = {}

    def _version_settings(self, v: Version) -> tuple[bool, bool, int, float, str]:
        """(llm, prefix routing, max queue, max wait, model name) of a version, parsed once per revision."""
        cached = self._settings.get((v.id, v.revision))
        if cached is None:
            config: dict[str, Any] = v.config or {}
            llm = config.get("engine") is not None
            routing = config.get("routing") or {}
            policy = routing.get("policy", "auto")
            prefix = policy == "prefix" or (policy == "auto" and llm)
            engine = config.get("engine") or {}
            name = engine.get("served_model_name") or config.get("name") or ""
            cached = (llm, prefix, int(routing.get("max_queue", 256)), float(routing.get("max_wait_s", 120.0)), name)
            self._settings[(v.id, v.revision)] = cached
        return cached

    def snapshot(self) -> tuple[list[KeyInfo], dict[str, DeploymentRoute]]:
        with self.control.sessions() as s:
            deps = {d.id: d.name for d in s.scalars(select(Deployment)).all()}
            versions = s.scalars(select(Version)).all()
            envs = s.scalars(select(Environment)).all()
            ready = s.execute(select(Replica.id, Replica.deployment, Replica.version, Replica.url)
                              .where(Replica.state == "ready")).all()
            settings = {(v.deployment_id, v.number): self._version_settings(v) for v in versions}
        routes: dict[str, DeploymentRoute] = {}
        for dep_id, name in deps.items():
            mine = {n: st for (d, n), st in settings.items() if d == dep_id}
            # An environment waiting for its first version to start routes to it: requests are held, not refused.
            environments = {e.name: env_traffic(e) or ([(e.pending_version, 100)] if e.pending_version else [])
                            for e in envs if e.deployment_id == dep_id}
            # The deployment's behaviour follows its production version (else its newest).
            lead = (environments.get("production") or [(max(mine, default=0), 100)])[0][0]
            llm, prefix, max_queue, max_wait, _ = mine.get(lead, (False, False, 256, 120.0, ""))
            versions = {n: VersionRoute(n, model_name=st[4] or None) for n, st in mine.items()}
            routes[name] = DeploymentRoute(name=name, llm=llm, versions=versions,
                                           environments=environments, prefix_routing=prefix, max_queue=max_queue,
                                           max_wait_s=max_wait)
        for rid, dep, number, url in ready:
            route = routes.get(dep)
            if route is not None and url and number in route.versions:
                route.versions[number].endpoints.append(Endpoint(rid, url, number))
        keys = [KeyInfo(id=k.id, key_hash=k.key_hash, scopes=frozenset(k.scopes),
                        deployments=frozenset(k.deployments) if k.deployments is not None else None,
                        rpm=k.rpm, tpm=k.tpm, token_budget=k.token_budget, budget_per=k.budget_per,
                        used_in_period=k.used_in_period) for k in self.keys.live()]
        return keys, routes

    async def write_usage(self, batch: dict[UsageKey, UsageCounts]) -> None:
        rows = [{"key_id": k, "deployment": d, "version": v, "hour": h, "requests": c.requests,
                 "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                 "cached_tokens": c.cached_tokens, "errors": c.errors} for (k, d, v, h), c in batch.items()]
        await asyncio.to_thread(self.keys.add_usage, rows)

    def request_capacity(self, deployment: str, version: int) -> None:
        # The held request already counts as in-flight load; run the autoscaler now rather than next tick.
        if self.reconciler is not None:
            self.reconciler.wake()
