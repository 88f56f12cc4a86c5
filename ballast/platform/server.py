"""`ballast up`: the platform process (REST API + reconciler) in one asyncio server.

Exits cleanly on Ctrl-C or SIGTERM: uvicorn stops accepting, the lifespan stops the reconciler and
every replica (drain, SIGTERM, SIGKILL after the grace period), and a last sweep stops any process
of this platform instance that is still running, so no orphan is left behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry

from ballast.backends import Backend, LocalBackend
from ballast.control import ControlPlane, Settings
from ballast.control.autoscaler import Autoscaler
from ballast.control.lease import Lease
from ballast.gateway.service import Gateway
from ballast.home import ballast_home
from ballast.observe import configure_logging
from ballast.observe.replica_auth import set_secret as set_replica_secret
from ballast.platform.app import create_app
from ballast.platform.auth import bootstrap_admin, setting
from ballast.platform.source import assemble
from ballast.platform.tls import PLAINTEXT_WARNING, is_loopback, tls_settings
from ballast.runtime.serve import bind_socket
from ballast.store import default_url, open_store, safe_url

log = logging.getLogger("ballast.platform")
CREDENTIALS_FILE = "credentials.json"


@dataclass
class PlatformOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str | None = None
    no_isolation: bool = False
    retire_grace_s: float = 300.0
    replica_command: list[str] | None = None
    webhook_allow: list[str] = field(default_factory=list)  # CIDRs webhooks may target although private
    tls_cert: str | None = None
    tls_key: str | None = None
    max_package_bytes: int | None = None
    backend: str = "local"
    ray_address: str | None = None
    ha: bool = False  # one of several platforms on one store: reconcile under a lease, leave replicas on stop
    redis_url: str | None = None  # share limits, prefix affinity and load with the other gateways (gateway/shared.py)
    redis_prefix: str | None = None  # Redis key prefix (default: BALLAST_REDIS_PREFIX, else one per platform)


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default


def credentials_path(home: Path | None = None) -> Path:
    return (home or ballast_home()) / CREDENTIALS_FILE


def save_credentials(url: str, api_key: str | None, home: Path | None = None) -> Path:
    """Write `{url, api_key}` to `$BALLAST_HOME/credentials.json` with mode 0600 (keeps a saved key)."""
    path = credentials_path(home)
    data: dict[str, str] = {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    data["url"] = url
    if api_key:
        data["api_key"] = api_key
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


class _Server(uvicorn.Server):
    """uvicorn re-raises the stop signal after shutdown (killing the process before `finally` runs);
    a platform stopped by Ctrl-C or SIGTERM exits normally instead, after its last sweep."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _share_state(opts: PlatformOptions, gateway: Gateway, autoscaler: Autoscaler, instance_id: str,
                 registry: CollectorRegistry) -> None:
    """With a Redis URL, this gateway shares limits, prefix affinity and load with the others (gateway/shared.py)."""
    redis_url = opts.redis_url or os.environ.get("BALLAST_REDIS_URL")
    if not redis_url:
        return
    try:
        from ballast.gateway.shared import default_prefix, install_shared  # redis is optional (`ballast[redis]`)
    except ImportError as e:
        raise RuntimeError(f"--redis-url needs the redis package: pip install 'ballast[redis]' ({e})") from None
    install_shared(gateway, autoscaler, redis_url, opts.redis_prefix or default_prefix(instance_id), registry)


def run_platform(opts: PlatformOptions, announce: Callable[[str], None] = print) -> None:
    """Run until Ctrl-C/SIGTERM. Prints the URL, and the admin key on the very first start."""
    configure_logging()
    for noisy in ("alembic", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    home = ballast_home()
    url = opts.database_url or os.environ.get("BALLAST_DATABASE_URL") or default_url()
    try:
        _engine, sessions = open_store(url)
    except Exception as e:
        raise RuntimeError(f"cannot open the store at {safe_url(url)}: {type(e).__name__}: {e}") from None
    instance_id = setting(sessions, "instance_id", os.urandom(8).hex())
    # Replicas beyond this machine (Ray) answer only callers with their token; every platform on this store
    # derives the same tokens (observe.replica_auth).
    set_replica_secret(setting(sessions, "replica_secret", os.urandom(32).hex()))
    secret = bootstrap_admin(sessions)
    settings = Settings(
        retire_grace_s=opts.retire_grace_s,
        drain_s=_env_float("BALLAST_DRAIN_S", 1.0),
        backoff_base_s=_env_float("BALLAST_BACKOFF_BASE_S", 1.0),
        backoff_max_s=_env_float("BALLAST_BACKOFF_MAX_S", 60.0),
        interval_s=_env_float("BALLAST_RECONCILE_INTERVAL_S", 0.5),
    )
    extra_args = ["--no-isolation"] if opts.no_isolation else []
    backend: Backend
    if opts.backend == "ray":
        from ballast.backends.ray import RayBackend  # Ray is an optional dependency (`pip install ballast[ray]`)

        backend = RayBackend(instance_id, address=opts.ray_address, logs_dir=home / "logs",
                             command=opts.replica_command, extra_args=extra_args)
    elif opts.backend == "local":
        backend = LocalBackend(instance_id, logs_dir=home / "logs", command=opts.replica_command,
                               extra_args=extra_args)
    else:
        raise ValueError(f"unknown backend {opts.backend!r} (local or ray)")
    control = ControlPlane(sessions, home, settings)
    registry = CollectorRegistry()
    lease = Lease(sessions, f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}") if opts.ha else None
    reconciler, gateway = assemble(control, backend, registry, webhook_allow=opts.webhook_allow, lease=lease)
    _share_state(opts, gateway, reconciler.autoscaler, instance_id, registry)
    app = create_app(control, reconciler, gateway=gateway, registry=registry)
    if opts.max_package_bytes:
        rest: Any = getattr(app, "api", app)  # the FastAPI app behind the platform's front
        rest.state.max_package_bytes = opts.max_package_bytes
    ssl = tls_settings(opts.tls_cert, opts.tls_key)
    sock = bind_socket(opts.host, opts.port)
    port = sock.getsockname()[1]
    shown = f"[{opts.host}]" if ":" in opts.host else opts.host
    base = f"{'https' if ssl else 'http'}://{shown}:{port}"
    # Listening on every address: the saved URL (what the CLI on this machine uses) is loopback.
    local = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(opts.host)
    cred = save_credentials(base.replace(shown, local, 1) if local else base, secret, home)
    announce(f"ballast platform: {base}/api/v1 (store: {safe_url(url)}, home: {home}; "
             f"API docs: {base}/api/v1/docs)")
    announce(f"OpenAI-compatible gateway: {base}/v1 (keys: `ballast keys create --scope inference`)")
    announce(f"dashboard: {base}/ (sign in with an API key)")
    if not ssl and not is_loopback(opts.host):
        announce(PLAINTEXT_WARNING.format(host=opts.host))
    if secret:
        announce(f"admin API key (shown once; saved to {cred}):\n  {secret}")
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5,
                            server_header=False, lifespan="on",
                            ssl_certfile=ssl.get("ssl_certfile"), ssl_keyfile=ssl.get("ssl_keyfile"))
    server = _Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        # Belt and braces: nothing of this instance survives a clean exit (with --ha the replicas are the fleet's).
        for h in [] if opts.ha else reconciler.backend.list():  # every pool's
            log.warning("stopping leftover replica process %s (pid %s)", h.replica_id, h.pid)
            backend.stop(h, 5.0)
    announce("ballast platform stopped")
