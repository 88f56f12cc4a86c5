"""The long-running commands: `ballast up` (the platform) and `ballast dev` (a reloading replica on it)."""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from ballast.cli.options import KeyOpt, UrlOpt, make_console
from ballast.cli.platform_client import PlatformClient

console = make_console()
err = make_console(stderr=True)
EVENTS_LOGGER = "ballast.events"


class EventFormatter(logging.Formatter):
    """`HH:MM:SS message` (UTC, like the event log); a line that already starts with its time is kept as is."""

    converter = staticmethod(time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if re.match(r"\d\d:\d\d:\d\d ", msg) else f"{self.formatTime(record, '%H:%M:%S')} {msg}"


def configure_up_console() -> None:
    """One plain line (time + message) per lifecycle event; everything else only from WARNING up.

    Leaves the logging as it is when the user asked for it (BALLAST_LOG_LEVEL or JSON logs)."""
    if os.environ.get("BALLAST_LOG_LEVEL") or os.environ.get("BALLAST_LOG_FORMAT", "text") != "text":
        return
    logging.getLogger().setLevel(logging.WARNING)
    events = logging.getLogger(EVENTS_LOGGER)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(EventFormatter())
    events.handlers[:] = [handler]
    events.setLevel(logging.INFO)
    events.propagate = False


class _Announcer:
    """Prints the platform's banner. `run_platform` sets up logging before its first announcement, so that
    first call is where `up` narrows the console (doing it earlier would be overwritten)."""

    def __init__(self) -> None:
        self.configured = False

    def __call__(self, message: str) -> None:
        if not self.configured:
            configure_up_console()
            self.configured = True
        print(message, flush=True)


def up(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: a free one).")] = 8000,
    database_url: Annotated[str | None, typer.Option(
        "--database-url", help="SQLAlchemy URL (postgresql://...); default SQLite at $BALLAST_HOME/state.db.")] = None,
    no_isolation: Annotated[bool, typer.Option(
        "--no-isolation", help="Replicas use this Python environment instead of per-package ones.")] = False,
    retire_grace_s: Annotated[float, typer.Option(
        help="A version that leaves every environment keeps its replicas this long (instant rollback).")] = 300.0,
    tls_cert: Annotated[str | None, typer.Option("--tls-cert", help="PEM certificate: serve HTTPS.")] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key", help="PEM private key of --tls-cert.")] = None,
    max_package_bytes: Annotated[int | None, typer.Option(
        help="Largest package upload accepted, 413 beyond (default: BALLAST_MAX_PACKAGE_BYTES or 2 GiB).")] = None,
    backend: Annotated[str, typer.Option(help="Where replicas run: local (processes) or ray (a Ray cluster).")]
        = "local",
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="Ray cluster address for --backend ray (default: RAY_ADDRESS or auto).")] = None,
    ha: Annotated[bool, typer.Option("--ha", help="One of several platforms on one database: one reconciles at a "
                                     "time (a lease in the store); a clean stop leaves the replicas running.")]
        = False,
    webhook_allow: Annotated[list[str] | None, typer.Option(
        "--webhook-allow", metavar="CIDR", help="CIDR that async webhooks may target although private or "
        "loopback (repeatable; also BALLAST_WEBHOOK_ALLOW, comma-separated).")] = None,
    redis_url: Annotated[str | None, typer.Option(
        "--redis-url", envvar="BALLAST_REDIS_URL", help="redis://HOST:PORT/DB: gateways share rate limits, budgets, "
        "prefix affinity and load through it (for --ha); without it all stays in this process.")] = None,
    redis_prefix: Annotated[str | None, typer.Option(
        "--redis-prefix", envvar="BALLAST_REDIS_PREFIX", help="Prefix of this platform's Redis keys (default: "
        "ballast:<instance id>:, the same for every platform on one store).")] = None,
) -> None:
    """Start the platform: REST API, gateway, reconciler, replicas on this machine. Ctrl-C stops it all.

    Prints the URLs (and the admin key on the first start), then one line per lifecycle event.
    State and caches live in $BALLAST_HOME (default ~/.ballast); BALLAST_LOG_LEVEL=INFO shows every log."""
    from ballast.platform import PlatformOptions, run_platform

    run_platform(PlatformOptions(host=host, port=port, database_url=database_url, no_isolation=no_isolation,
                                 retire_grace_s=retire_grace_s, webhook_allow=webhook_allow or [], tls_cert=tls_cert,
                                 tls_key=tls_key, max_package_bytes=max_package_bytes, backend=backend,
                                 ray_address=ray_address, ha=ha, redis_url=redis_url, redis_prefix=redis_prefix),
                 announce=_Announcer())


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _announce_ready(c: PlatformClient, dep: str, version: int, stop: threading.Event) -> None:
    """Print each ready replica of the dev version once (a reload starts a new one)."""
    seen: set[str] = set()
    while not stop.wait(0.5):
        try:
            reps = c.get(f"/deployments/{dep}")["replicas"]
        except ValueError:
            continue
        for r in reps:
            if r["version"] == version and r["state"] == "ready" and r["url"] and r["id"] not in seen:
                seen.add(r["id"])
                console.print(f"ready: {r['url']} (replica {r['id']})", markup=False)


def dev(
    path: Annotated[Path, typer.Argument(help="Package directory (with ballast.yaml).")],
    name: Annotated[str | None, typer.Option("--name", "-n", help="Deployment name (default: the package's).")] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Run a development replica from PATH that reloads when its files change; Ctrl-C or SIGTERM stops it.

    Prints the replica's URL when it is ready (again after each reload) and its log lines."""
    c = PlatformClient(url, api_key)
    if not c.is_local:
        raise ValueError("`ballast dev` needs a platform on this machine (it runs the replica from PATH)")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    stop = threading.Event()
    dep: str | None = None
    try:
        r = c.post("/dev", {"path": str(path.resolve()), "name": name})
        dep, env, version = r["deployment"], r["environment"], r["version"]
        console.print(f"{dep}: development replica of {r['path']} (version {version}, environment {env}); "
                      "reloads on change, Ctrl-C stops it", markup=False)
        console.print(f"through the gateway: {c.url}/deployments/{dep}/environments/{env}/predict, "
                      f"or model {dep}@{env} at {c.url}/v1", markup=False)
        threading.Thread(target=_announce_ready, args=(PlatformClient(url, api_key), dep, version, stop),
                         daemon=True).start()
        for line in c.stream_lines(f"/deployments/{dep}/logs", {"version": version, "follow": True, "tail": 0}):
            console.print(line, markup=False, soft_wrap=True)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        if dep is not None:
            _dev_stop(c, dep)
        signal.signal(signal.SIGTERM, previous)


def _dev_stop(c: PlatformClient, dep: str) -> None:
    try:
        r = c.request("DELETE", f"/dev/{dep}")
        gone = " (and the deployment, which had nothing else)" if isinstance(r, dict) and r.get("deleted") else ""
        console.print(f"{dep}: development replica stopped{gone}", markup=False)
    except ValueError as e:
        err.print(f"could not stop the development replica: {e}", markup=False)


def register(app: typer.Typer) -> None:
    app.command()(up)
    app.command()(dev)
