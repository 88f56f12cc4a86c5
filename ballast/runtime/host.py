"""What the replica server needs from whatever runs the model: a Python class, the native engine, or
an external engine command. `ReplicaApp` talks to a `Host` only; each host implements all of it."""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.responses import Response

from ballast.package import Package
from ballast.runtime.model import LoadState

Handler = Callable[[Request], Awaitable[Response]]
ExtraRoute = tuple[str, Handler, list[str]]

# The x-ballast-priority header of the request being served (None: not sent). A context variable rather than
# a body field, so a Python model's `chat_completions(body)` sees exactly what the client sent.
request_priority: contextvars.ContextVar[int | None] = contextvars.ContextVar("ballast_priority", default=None)
# Whether the request carried x-ballast-stream-tokens: the gateway asks an LLM replica to report the token ids of
# each streamed chunk (an SSE comment it strips), so it can resume the stream elsewhere if this replica dies.
stream_tokens: contextvars.ContextVar[bool] = contextvars.ContextVar("ballast_stream_tokens", default=False)
STREAM_TOKENS_HEADER = "x-ballast-stream-tokens"


@runtime_checkable
class Host(Protocol):
    package: Package
    state: LoadState
    error: str | None
    load_seconds: float | None

    async def load(self) -> None:
        """Load the model; never raises (`state` and `error` say what happened)."""

    async def shutdown(self) -> None:
        """Release threads, engines and child processes when the server stops."""

    async def healthy(self) -> tuple[bool, str | None]:
        """Readiness, with the reason when not ready."""

    def has(self, name: str) -> bool:
        """Whether `predict` or an OpenAI method (`chat_completions`, ...) is served."""

    def cancellable(self, name: str) -> bool:
        """Whether cancelling a call stops its work (so a client that leaves frees the slot at once)."""

    def bind_metrics(self, registry: CollectorRegistry) -> None:
        """Register the host's own metrics (engine gauges) in the replica's registry."""

    def extra_routes(self) -> list[ExtraRoute]:
        """Routes beyond /predict and the OpenAI ones: (path, handler, methods)."""

    async def call(self, name: str, body: Any) -> Any:
        """An OpenAI method: a value, a Response, or an async iterator that the server streams."""

    async def predict(self, inputs: Any) -> Any:
        """`/predict`: a value, a Response, or an async iterator that the server streams."""
