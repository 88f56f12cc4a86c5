"""The replica side of a deployed chain: one step served as a Ballast `Model` (what the generated model.py uses).

Its dependencies become `RemoteHandle`s to their own deployments (straight to their ready replicas, which the
gateway at `BALLAST_CHAIN_GATEWAY` lists, or through it), pinned to the versions the chain version was built with,
and authenticated with the chain's internal key, which the platform puts in the replica's environment
(`BALLAST_CHAIN_KEY`) and which the replica refreshes after a rotation; the user's key is never involved. A
streaming step answers with SSE. Each call logs one line with the chain's trace id, so every step's log has it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from functools import partial
from typing import Any, ClassVar

from ballast.chains.chainlet import Chainlet, Dependency, contract_of, dependencies_of
from ballast.chains.context import deadline_var, request_id_var, trace_id_var
from ballast.chains.errors import ChainError
from ballast.chains.handle import StepHandle
from ballast.chains.local import load_module
from ballast.chains.remote import ChainKey, Client, RemoteHandle
from ballast.observe import request_id_var as http_request_id_var
from ballast.observe.hops import ENVELOPE, new_trace_id
from ballast.openai.errors import APIError

log = logging.getLogger("ballast.chains")
KEY_VAR = "BALLAST_CHAIN_KEY"
REFRESH_VAR = "BALLAST_CHAIN_KEY_REFRESH_S"  # how often to ask for the chain's current key (seconds, default 30)


def deployment_name(chain: str, step: str) -> str:
    """`{chain}-{step}` in the platform's name rules: `EmbedText` in chain `demo` is `demo-embed-text`."""
    kebab = "".join(f"-{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(step))
    return f"{chain}-{kebab}"


def _status(e: ChainError, step: str) -> int:
    """504 for a deadline, 400 for the caller's own inputs breaking this step's contract, else 500."""
    if e.kind == "deadline":
        return 504
    if e.kind == "contract" and e.step == step and e.message.startswith("input"):
        return 400
    return 500


class StepModel:
    """Serve one step of a chain file; the generated model.py makes a subclass naming the file and the step."""

    chain_file: str = ""
    step: str = ""
    chain: str = ""
    versions: ClassVar[dict[str, int]] = {}  # the version of each step this one calls, by class name

    def __init__(self) -> None:
        module = load_module(self.chain_file)
        cls: type[Chainlet] = getattr(module, self.step)
        self._cls = cls
        gateway = os.environ.get("BALLAST_CHAIN_GATEWAY", "http://127.0.0.1:8000")
        key = os.environ.get(KEY_VAR, "")
        deps = dependencies_of(cls)
        if deps and not key:
            log.warning("step %s of chain %s has no %s: calls to other steps will be refused", self.step,
                        self.chain, KEY_VAR)
        self.client = Client()
        self.key = ChainKey(key, gateway, self.chain)
        self._refresher: asyncio.Task[None] | None = None
        handles = {name: RemoteHandle(contract_of(d.target), d, gateway, deployment_name(self.chain, d.target.__name__),
                                      self.key, self.client, self.versions.get(d.target.__name__), self.chain)
                   for name, d in deps.items()}
        self.handle = StepHandle(cls(**handles), contract_of(cls), Dependency(cls))

    def _refreshing(self) -> None:
        """Start (once, in the replica's event loop) the task that picks up a rotated internal key."""
        if self._refresher is None and self.key.value and dependencies_of(self._cls):
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_key())

    async def _refresh_key(self) -> None:
        every = float(os.environ.get(REFRESH_VAR) or 30)
        while True:
            await asyncio.sleep(every)
            if await self.key.refresh(self.client):
                log.info("chain %s step %s: now using the chain's rotated internal key", self.chain, self.step)

    async def is_healthy(self) -> bool:
        """Readiness probes start the key refresher even before the first call (an idle step may outlive a
        rotation's grace)."""
        self._refreshing()
        return True

    async def predict(self, inputs: Any) -> Any:
        self._refreshing()
        meta: dict[str, Any] = {}
        if isinstance(inputs, dict) and ENVELOPE in inputs:
            meta, inputs = inputs[ENVELOPE] or {}, inputs.get("inputs", {})
        if not isinstance(inputs, dict):
            raise APIError(400, f"step {self.step} takes a JSON object of its run() arguments", code="chain_input")
        deadline = meta.get("deadline_s")
        scope = _Scope(str(meta.get("request_id") or http_request_id_var.get()),
                       str(meta.get("trace_id") or new_trace_id()),
                       None if deadline is None else asyncio.get_running_loop().time() + float(deadline))
        if self.handle.contract.kind == "stream":
            return await self._stream(inputs, scope)
        with scope:
            log.info("chain %s step %s started (trace %s)", self.chain, self.step, scope.trace)
            value = await self._step(lambda: self.handle.run(**inputs))
        return self.handle.contract.output.dump_python(value, mode="json")

    async def _step(self, work: Callable[[], Awaitable[Any]]) -> Any:
        """Await one piece of the step's work; its `ChainError` becomes the error body a caller decodes again."""
        try:
            return await work()
        except ChainError as e:
            log.info("chain %s step %s failed (trace %s): %s", self.chain, self.step, trace_id_var.get(), e)
            raise APIError(_status(e, self.step), e.message, code=f"chain_{e.kind}", param=e.step) from None
        except asyncio.CancelledError:
            log.info("chain %s step %s cancelled (trace %s)", self.chain, self.step, trace_id_var.get())
            raise

    async def _stream(self, inputs: dict[str, Any], scope: _Scope) -> AsyncIterator[Any]:
        """A streaming step: the first item is awaited before answering (an error before it is a plain HTTP error,
        which the caller may retry); later items go out as SSE events as they come, a failure as an error event.
        Each item runs in the call's context (the replica pulls items from its own task)."""
        dump = self.handle.contract.output.dump_python
        with scope:
            log.info("chain %s step %s started (trace %s)", self.chain, self.step, scope.trace)
            items = await self._step(partial(_started, self.handle, inputs))
            first = await self._next(items)

        async def rest() -> AsyncIterator[Any]:
            try:
                item = first
                while item is not _END:
                    yield dump(item, mode="json")
                    with scope:
                        item = await self._next(items)
            finally:
                with scope:
                    await items.aclose()

        return rest()

    async def _next(self, items: Any) -> Any:
        try:
            return await self._step(partial(anext, items))
        except StopAsyncIteration:
            return _END


_END = object()


async def _started(handle: StepHandle, inputs: dict[str, Any]) -> Any:
    """A streaming step's iterator (its inputs checked now: a contract error is raised here, before any item)."""
    return handle.run(**inputs)


class _Scope:
    """The call's request id, trace id and deadline, set around each piece of the step's work."""

    def __init__(self, request_id: str, trace: str, deadline: float | None) -> None:
        self.values: tuple[tuple[ContextVar[Any], Any], ...] = (
            (request_id_var, request_id), (trace_id_var, trace), (deadline_var, deadline))
        self.trace = trace
        self._tokens: list[Any] = []

    def __enter__(self) -> _Scope:
        self._tokens = [var.set(value) for var, value in self.values]
        return self

    def __exit__(self, *_: object) -> None:
        for (var, _v), token in zip(reversed(self.values), reversed(self._tokens), strict=True):
            var.reset(token)
