"""The gateway's view of the control plane, and the one place the platform's parts are wired together.

Routes come from the control plane's routing snapshot (`ballast.control.snapshot`), keys from the
key store; usage goes back in batches. `assemble` settles the startup cycle gateway -> reconciler ->
autoscaler -> gateway: the autoscaler reads load through the `LoadSignal` the gateway implements, and
the gateway asks for capacity through the reconciler's `wake`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from ballast.backends import Backend
from ballast.config import BallastConfig
from ballast.control import ControlPlane, Reconciler
from ballast.control.async_queue import AsyncPolicy, AsyncQueue
from ballast.control.autoscaler import Autoscaler
from ballast.control.batches import BatchStore
from ballast.control.chains import ChainStore
from ballast.control.datasets import Datasets
from ballast.control.keys import KeyRecord, KeyStore
from ballast.control.lease import Lease
from ballast.control.metrics_history import MetricsHistory
from ballast.control.metrics_sampler import Sampler, interval_from_env
from ballast.control.snapshot import DeploymentTargets
from ballast.control.webhooks import WebhookSecrets, WebhookSender, allow_from_env, parse_allow
from ballast.gateway.async_api import AsyncAPI
from ballast.gateway.async_dispatch import Dispatcher
from ballast.gateway.batches import BatchAPI
from ballast.gateway.capture import Capture, CapturePolicy
from ballast.gateway.chains import ChainRoutes
from ballast.gateway.metering import UsageCounts, UsageKey
from ballast.gateway.routing import Endpoint
from ballast.gateway.service import DeploymentRoute, Gateway, VersionRoute


class StoreSource:
    def __init__(self, control: ControlPlane, wake: Callable[[], None] | None = None):
        self.control = control
        self.wake = wake
        self.keys = KeyStore(control.sessions)

    def generation(self) -> int:
        return self.control.routing.generation

    def snapshot(self) -> tuple[list[KeyRecord], dict[str, DeploymentRoute]]:
        snap = self.control.routing.read()
        return self.keys.live(), {name: _route(d) for name, d in snap.deployments.items()}

    async def write_usage(self, batch: dict[UsageKey, UsageCounts]) -> None:
        rows = [{"key_id": k, "deployment": d, "version": v, "hour": h, "requests": c.requests,
                 "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                 "cached_tokens": c.cached_tokens, "errors": c.errors} for (k, d, v, h), c in batch.items()]
        await asyncio.to_thread(self.keys.add_usage, rows)

    def request_capacity(self, deployment: str, version: int) -> None:
        # The held request already counts as in-flight load; run the autoscaler now rather than next tick.
        if self.wake is not None:
            self.wake()


def _served_name(cfg: BallastConfig) -> str | None:
    return getattr(cfg.engine, "served_model_name", None) or cfg.name or None


def _route(d: DeploymentTargets) -> DeploymentRoute:
    # An environment waiting for its first version to start routes to it: requests are held, not refused.
    environments = {env: traffic or ([(d.pending[env], 100)] if env in d.pending else [])
                    for env, traffic in d.environments.items()}
    # The deployment's behaviour follows its production version (else its newest).
    lead = (environments.get("production") or [(max(d.versions, default=0), 100)])[0][0]
    target = d.versions.get(lead)
    cfg = target.config if target is not None else None
    llm = cfg is not None and cfg.engine is not None
    policy = cfg.routing.policy if cfg is not None else "auto"
    versions = {n: VersionRoute(n, [Endpoint(rid, url, n, meta={"remote": True} if rid in t.remote else {})
                                    for rid, url in t.replicas], _served_name(t.config),
                                frozenset(getattr(t.config.engine, "adapters", None) or ()))
                for n, t in d.versions.items()}
    return DeploymentRoute(name=d.name, llm=llm, versions=versions, environments=environments,
                           prefix_routing=policy == "prefix" or (policy == "auto" and llm),
                           max_queue=cfg.routing.max_queue if cfg is not None else 256,
                           max_wait_s=cfg.routing.max_wait_s if cfg is not None else 120.0,
                           migration_limit=cfg.routing.migration_limit if cfg is not None else 3,
                           async_policy=AsyncPolicy(cfg.async_.max_queue, cfg.async_.max_concurrency,
                                                    cfg.async_.result_ttl_s) if cfg is not None else AsyncPolicy(),
                           concurrency_target=cfg.autoscaling.concurrency_target if cfg is not None else 1.0,
                           capture=_capture(cfg))


def _capture(cfg: BallastConfig | None) -> CapturePolicy | None:
    c = cfg.capture if cfg is not None else None
    return CapturePolicy(c.dataset, c.sample_rate, tuple(c.redact), c.retention_days) if c is not None else None


def assemble(control: ControlPlane, backend: Backend, registry: CollectorRegistry,
             webhook_allow: list[str] | None = None, lease: Lease | None = None) -> tuple[Reconciler, Gateway]:
    """Build the reconciler and the gateway of one platform process, each knowing what it needs of the other."""
    autoscaler = Autoscaler()
    reconciler = Reconciler(control, backend, autoscaler=autoscaler, registry=registry, lease=lease)
    gateway = Gateway(StoreSource(control, reconciler.wake), registry)
    autoscaler.signal = install_async(control, gateway, webhook_allow or [])
    install_history(control, gateway, registry)
    chains = ChainStore(control)
    gateway.extra_routes += ChainRoutes(gateway, chains.targets, chains.keys.current_for).routes()
    install_capture(control, gateway)
    install_finetune(control, gateway)
    return reconciler, gateway


def install_capture(control: ControlPlane, gateway: Gateway) -> None:
    """Opt-in capture (its retention sweep a gateway companion) and `POST /v1/feedback`."""
    gateway.capture = Capture(gateway, Datasets(control.sessions, control.home))
    gateway.companions.append(gateway.capture)
    gateway.extra_routes += gateway.capture.routes()


def install_finetune(control: ControlPlane, gateway: Gateway) -> None:
    """Fine-tuning jobs: the `/v1/fine_tuning/jobs` routes and their runner (a gateway companion)."""
    from ballast.control.finetune import FineTunes
    from ballast.control.finetune_state import FineTuneState
    from ballast.gateway.finetune_api import FineTuneAPI
    from ballast.platform.finetune_runner import FineTuneRunner

    runner = FineTuneRunner(FineTuneState(control.sessions), control.home)  # its gate: create_app
    gateway.companions.append(runner)
    gateway.extra_routes += FineTuneAPI(gateway, FineTunes(control.sessions, control.home), runner.wake).routes()


def install_history(control: ControlPlane, gateway: Gateway, registry: CollectorRegistry) -> Sampler | None:
    """The metrics-history sampler, a gateway companion reading its registry and its ready replicas (none when
    BALLAST_METRICS_INTERVAL_S=0)."""
    interval = interval_from_env()
    if not interval:
        return None

    def targets() -> list[tuple[str, str, str]]:
        return [(d.name, ep.replica_id, ep.url) for d in gateway.routes.values() for v in d.versions.values()
                for ep in v.endpoints]

    sampler = Sampler(MetricsHistory(control.sessions, interval), registry, targets)
    gateway.companions.append(sampler)
    return sampler


def install_async(control: ControlPlane, gateway: Gateway, webhook_allow: list[str]) -> Dispatcher:
    """The async queue's dispatcher (a gateway companion, and the autoscaler's load signal: in-flight plus queued)
    and its routes on the gateway."""
    queue = AsyncQueue(control.sessions)
    allow = allow_from_env() + parse_allow(webhook_allow)
    dispatcher = Dispatcher(gateway, queue, WebhookSender(queue, WebhookSecrets(control.sessions), allow))
    gateway.companions.append(dispatcher)
    gateway.extra_routes += AsyncAPI(gateway, queue, dispatcher, allow).routes()
    batches = BatchStore(control.sessions)
    dispatcher.chores.append(batches.progress)
    dispatcher.chores.append(batches.sweep_files)
    gateway.extra_routes += BatchAPI(gateway, batches, dispatcher).routes()
    return dispatcher
