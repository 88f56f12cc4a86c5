"""Running one replica in the foreground: uvicorn, graceful SIGTERM, a ready line on stdout."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from ballast.observe import configure_logging
from ballast.observe.replica_auth import take_token
from ballast.package import Package
from ballast.runtime.model import LoadState, ModelHost
from ballast.runtime.server import ReplicaApp

log = logging.getLogger("ballast.runtime")


class _DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT mark the replica not-ready at once, then let uvicorn drain in-flight requests."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Like uvicorn's, but a graceful stop exits 0 instead of re-raising the signal."""
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets on Linux
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_host(package: Package) -> Any:
    """The host for a package: its Python model, the native LLM engine, or an external engine command."""
    engine = package.config.engine
    if engine is None:
        return ModelHost(package)
    if engine.kind == "native":
        from ballast.runtime.llm import EngineHost

        return EngineHost(package)
    from ballast.runtime.command import CommandHost

    return CommandHost(package)


def serve_package(
    package: Package,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    access_log: bool = False,
    announce: Callable[[str], None] = lambda m: print(m, flush=True),
    build_host: Callable[[Package], Any] | None = None,
) -> None:
    """Serve `package` until SIGTERM/SIGINT; prints `ready: URL` once the model has loaded."""
    configure_logging()
    logging.getLogger("uvicorn.access").disabled = not access_log  # configure_logging turns it off
    token = take_token()  # before the model's code runs: it never sees the token
    model_host = build_host(package) if build_host else make_host(package)
    runtime = package.config.runtime
    if package.config.engine is not None:
        from ballast.runtime.llm import engine_default_concurrency

        runtime = runtime.model_copy(update={"predict_concurrency": engine_default_concurrency(package.config)})
    replica = ReplicaApp(model_host, runtime, token=token)
    sock = bind_socket(host, port)
    actual_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{actual_port}"
    config = uvicorn.Config(
        replica.app,
        log_config=None,
        access_log=access_log,
        timeout_graceful_shutdown=int(package.config.runtime.shutdown_grace_s) or None,
        timeout_keep_alive=30,
        server_header=False,
    )

    def on_exit() -> None:
        if not replica.draining:
            replica.draining = True
            announce("shutting down: finishing in-flight requests")

    server = _DrainingServer(config, on_exit)

    async def main() -> None:
        announce(f"loading {package.name} from {package.path} (listening on {url})")
        watcher = asyncio.create_task(_announce_ready(model_host, url, announce))
        try:
            await server.serve(sockets=[sock])
        finally:
            watcher.cancel()

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (as uvicorn itself would choose), else the standard loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _announce_ready(model_host: Any, url: str, announce: Callable[[str], None]) -> None:
    started = time.monotonic()
    last = started
    while model_host.state is LoadState.LOADING:
        await asyncio.sleep(0.05)
        if time.monotonic() - last >= 10:
            last = time.monotonic()
            announce(f"still loading ({last - started:.0f}s)")
    if model_host.state is LoadState.READY:
        announce(f"ready: {url} (loaded in {time.monotonic() - started:.1f}s)")
    else:
        announce(f"load failed: {model_host.error}")
        print(f"error: the model failed to load: {model_host.error}", file=sys.stderr, flush=True)
