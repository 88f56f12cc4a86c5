"""A replica that runs an external engine (vLLM, SGLang, any OpenAI-compatible server) as a child.

The runtime starts the command, waits for its readiness path, proxies requests to it (streams pass
through unbuffered) and stops it on shutdown; limits, request ids and metrics stay Ballast's.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ballast.config.models import CommandEngineConfig
from ballast.observe import HOP_BY_HOP, REQUEST_ID_HEADER, current_request_id, free_port
from ballast.openai import APIError
from ballast.package import Package
from ballast.runtime.model import OPENAI_METHODS, LoadState

PRESETS: dict[str, dict[str, str]] = {
    "vllm": {"start": "vllm serve {model} --host 127.0.0.1 --port {port}", "readiness_path": "/health",
             "liveness_path": "/health"},
    "sglang": {"start": "python -m sglang.launch_server --model-path {model} --host 127.0.0.1 --port {port}",
               "readiness_path": "/health", "liveness_path": "/health"},
}



class CommandHost:
    """Owns the child engine process and proxies the OpenAI routes and /predict to it."""

    def __init__(self, package: Package):
        cfg = package.config.engine
        assert isinstance(cfg, CommandEngineConfig)
        self.package = package
        self.cfg = cfg
        preset = PRESETS.get(cfg.preset or "", {})
        self.start_cmd = cfg.start or preset["start"]
        self.readiness_path = cfg.readiness_path if "readiness_path" in cfg.model_fields_set or not preset \
            else preset["readiness_path"]
        self.liveness_path = cfg.liveness_path if "liveness_path" in cfg.model_fields_set or not preset \
            else preset["liveness_path"]
        self.state = LoadState.LOADING
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = cfg.port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """One pooled session (as the gateway uses), made inside the running loop on first use."""
        if self._session is None or self._session.closed:
            # No total timeout: a stream lasts as long as the engine generates; the replica's own
            # request_timeout_s bounds the request.
            self._session = aiohttp.ClientSession(
                base_url=self.base, timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0),
                auto_decompress=False,
            )
        return self._session

    async def _probe(self, path: str, timeout: float) -> int:
        async with self.session.get(path, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            await r.read()
            return r.status

    def command(self) -> list[str]:
        model = self.cfg.model or str(self.package.path)
        text = self.start_cmd.replace("{port}", str(self.port)).replace("{model}", model)
        return shlex.split(text)

    async def load(self) -> None:
        started = time.monotonic()
        try:
            self.proc = subprocess.Popen(self.command(), cwd=self.package.path, start_new_session=True,
                                         env={**os.environ, **self.package.config.environment_variables})
        except OSError as e:
            self.state, self.error = LoadState.FAILED, f"cannot start `{self.start_cmd}`: {e}"
            return
        while True:
            if self.proc.poll() is not None:
                self.state = LoadState.FAILED
                self.error = f"the engine command exited with status {self.proc.returncode} before it was ready"
                return
            try:
                if await self._probe(self.readiness_path, 2) == 200:
                    break
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
        self.load_seconds = time.monotonic() - started
        self.state = LoadState.READY

    async def shutdown(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            for _ in range(100):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            else:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._session is not None:
            await self._session.close()

    def has(self, name: str) -> bool:
        return name in OPENAI_METHODS or name == "predict"

    def cancellable(self, name: str) -> bool:
        """Cancelling closes the upstream connection, which vLLM and SGLang take as an abort."""
        return True

    def bind_metrics(self, registry: Any) -> None:
        """The engine serves its own metrics; the replica's are Ballast's."""

    async def healthy(self) -> tuple[bool, str | None]:
        if self.state is not LoadState.READY:
            return False, self.state.value if self.error is None else f"load failed: {self.error}"
        if self.proc is None or self.proc.poll() is not None:
            return False, "the engine process exited"
        try:
            status = await self._probe(self.liveness_path, 5)
        except (aiohttp.ClientError, TimeoutError) as e:
            return False, f"the engine does not answer: {type(e).__name__} {e}"
        return (True, None) if status == 200 else (False, f"the engine's health is {status}")

    def extra_routes(self) -> list[tuple[str, Callable[[Request], Awaitable[Response]], list[str]]]:
        async def passthrough(request: Request) -> Response:
            body = await request.body()
            return await self._forward(request.method, request.url.path, body or None)

        return [("/v1/models", passthrough, ["GET"]), ("/tokenize", passthrough, ["POST"]),
                ("/detokenize", passthrough, ["POST"])]

    async def predict(self, inputs: Any) -> Any:
        return await self._forward("POST", self.cfg.predict_path, inputs)

    async def call(self, name: str, body: Any) -> Any:
        return await self._forward("POST", OPENAI_METHODS[name], body)

    async def _forward(self, method: str, path: str, body: Any) -> Response:
        if self.state is not LoadState.READY:
            raise APIError(503, "the engine is not ready", code="model_loading", headers={"Retry-After": "2"})
        headers = {REQUEST_ID_HEADER: current_request_id()}
        if not isinstance(body, bytes | None):
            body = json.dumps(body).encode()
        if body is not None:
            headers["content-type"] = "application/json"
        try:
            resp = await self.session.request(method, path, data=body, headers=headers)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise APIError(503, f"the engine is unreachable: {type(e).__name__}", code="engine_unavailable",
                           headers={"Retry-After": "1"}) from None
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
        if resp.content_type == "text/event-stream":
            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in resp.content.iter_any():
                        yield chunk
                finally:
                    resp.release()

            return StreamingResponse(relay(), status_code=resp.status, headers=out_headers)
        try:
            content = await resp.read()
        finally:
            resp.release()
        return Response(content, status_code=resp.status, headers=out_headers)
