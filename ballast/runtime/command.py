"""A replica that runs an external engine (vLLM, SGLang, any OpenAI-compatible server) as a child.

The runtime starts the command, waits for its readiness path, proxies requests to it (streams pass
through unbuffered) and stops it on shutdown; limits, request ids and metrics stay Ballast's.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ballast.config.models import CommandEngineConfig
from ballast.observe import REQUEST_ID_HEADER, current_request_id
from ballast.openai import APIError
from ballast.package import Package
from ballast.runtime.model import OPENAI_METHODS, LoadState

PRESETS: dict[str, dict[str, str]] = {
    "vllm": {"start": "vllm serve {model} --host 127.0.0.1 --port {port}", "readiness_path": "/health",
             "liveness_path": "/health"},
    "sglang": {"start": "python -m sglang.launch_server --model-path {model} --host 127.0.0.1 --port {port}",
               "readiness_path": "/health", "liveness_path": "/health"},
}

_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "server",
                "date", "x-request-id"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        self.port = cfg.port or _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.client = httpx.AsyncClient(base_url=self.base, timeout=httpx.Timeout(None, connect=5.0))

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
                r = await self.client.get(self.readiness_path, timeout=2)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
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
        await self.client.aclose()

    def has(self, name: str) -> bool:
        return name in OPENAI_METHODS or name == "predict"

    async def healthy(self) -> tuple[bool, str | None]:
        if self.state is not LoadState.READY:
            return False, self.state.value if self.error is None else f"load failed: {self.error}"
        if self.proc is None or self.proc.poll() is not None:
            return False, "the engine process exited"
        try:
            r = await self.client.get(self.liveness_path, timeout=5)
        except httpx.HTTPError as e:
            return False, f"the engine does not answer: {e}"
        return (True, None) if r.status_code == 200 else (False, f"the engine's health is {r.status_code}")

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
        kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes | None) else {"json": body}
        req = self.client.build_request(method, path, headers=headers, **kwargs)
        try:
            resp = await self.client.send(req, stream=True)
        except httpx.HTTPError as e:
            raise APIError(503, f"the engine is unreachable: {type(e).__name__}", code="engine_unavailable",
                           headers={"Retry-After": "1"}) from None
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_HEADERS}
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in resp.aiter_raw():
                        yield chunk
                finally:
                    await resp.aclose()

            return StreamingResponse(relay(), status_code=resp.status_code, headers=out_headers)
        content = await resp.aread()
        await resp.aclose()
        return Response(content, status_code=resp.status_code, headers=out_headers)
