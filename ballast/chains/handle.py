"""Calling a step: validation both ways, the deadline, safe retries and one flat `ChainError`.

Every hop (the entry call too) goes through a `StepHandle`, so the same rules hold at every depth: the
step's own exception becomes a `ChainError` naming it; a `ChainError` from deeper passes through as is
(the innermost step is the one named, and it is not retried again here).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any

from pydantic import ValidationError

from ballast.chains.chainlet import Chainlet, Contract, Dependency
from ballast.chains.context import budget_s, current_request_id, deadline_var, remaining_s
from ballast.chains.errors import ChainError

BACKOFF_S = 0.05


def _describe(e: ValidationError, where: str) -> str:
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{where} field '{loc}': {err['msg']}" if loc else f"{where}: {err['msg']}")
    return "; ".join(parts)


class _Attempt:
    """One try at a hop: its timeout, and what its failure means (deadline, retryable or final)."""

    def __init__(self, step: str, timeout_s: float | None) -> None:
        self.step = step
        self.budget = budget_s(timeout_s)
        self.own_timeout = timeout_s is not None and (remaining_s() is None or self.budget == timeout_s)

    def deadline_error(self) -> ChainError:
        why = "its timeout" if self.own_timeout else "the caller's deadline"
        return ChainError(self.step, current_request_id(), f"exceeded {why} ({self.budget:.3g}s)", "deadline")

    @contextlib.asynccontextmanager
    async def limit(self) -> AsyncIterator[None]:
        """Run the body under this hop's budget; its own expiry is reported as a deadline error naming the step."""
        if self.budget is not None and self.budget <= 0:
            raise self.deadline_error()
        tm = asyncio.timeout(self.budget)
        loop = asyncio.get_running_loop()
        token = deadline_var.set(None if self.budget is None else loop.time() + self.budget)
        try:
            async with tm:
                yield
        except (TimeoutError, asyncio.CancelledError):
            if tm.expired():  # ours: name this step even when an outer deadline fired at the same moment
                raise self.deadline_error() from None
            raise
        finally:
            deadline_var.reset(token)


class StepHandle:
    """What `self.embed` is inside a step: `await self.embed.run(...)`, `self.embed.map(items)`."""

    def __init__(self, instance: Chainlet, contract: Contract, dep: Dependency) -> None:
        self._instance = instance
        self._contract = contract
        self._retries = dep.retries if dep.target.config.idempotent else 0
        self._timeout_s = dep.timeout_s

    @property
    def contract(self) -> Contract:
        return self._contract

    @property
    def step(self) -> str:
        return self._contract.step

    def _inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        rid = current_request_id()
        try:
            bound = self._contract.signature.bind(self._instance, *args, **kwargs)
        except TypeError as e:
            raise ChainError(self.step, rid, f"inputs: {e}", "contract") from None
        raw = {k: v for k, v in bound.arguments.items() if k in self._contract.params}
        try:
            model = self._contract.inputs.model_validate(raw)
        except ValidationError as e:
            raise ChainError(self.step, rid, _describe(e, "input"), "contract") from None
        return {name: getattr(model, name) for name in self._contract.params}

    def _output(self, value: Any) -> Any:
        try:
            return self._contract.output.validate_python(value)
        except ValidationError as e:
            raise ChainError(self.step, current_request_id(), _describe(e, "output"), "contract") from None

    def _failure(self, e: BaseException) -> ChainError:
        if isinstance(e, ChainError):
            return e
        return ChainError(self.step, current_request_id(), f"{type(e).__name__}: {e}")

    async def _pause(self, attempt: int) -> bool:
        """Sleep before a retry; False when the deadline leaves no room for one."""
        wait = BACKOFF_S * 2**attempt
        left = remaining_s()
        if left is not None and left <= wait:
            return False
        await asyncio.sleep(wait)
        return True

    def _retryable(self, e: BaseException, attempt: int) -> bool:
        return attempt < self._retries and not isinstance(e, ChainError)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the step: an awaitable of its result, or an async iterator when `run` is an async generator."""
        inputs = self._inputs(args, kwargs)
        if self._contract.kind == "stream":
            return self._stream(inputs)
        return self._call(inputs)

    async def _once(self, inputs: dict[str, Any]) -> Any:
        if self._contract.kind == "sync":
            return await asyncio.to_thread(self._instance.run, **inputs)  # type: ignore[attr-defined]
        return await self._instance.run(**inputs)  # type: ignore[attr-defined]

    def _open(self, inputs: dict[str, Any]) -> AsyncIterator[Any]:
        """Start one try at a stream (called outside the hop's limit: a remote step gets the caller's deadline)."""
        return self._instance.run(**inputs)  # type: ignore[attr-defined]

    async def _call(self, inputs: dict[str, Any]) -> Any:
        attempt = 0
        while True:
            hop = _Attempt(self.step, self._timeout_s)
            try:
                async with hop.limit():
                    value = await self._once(inputs)
            except ChainError as e:
                if not (e.kind == "deadline" and e.step == self.step and hop.own_timeout
                        and attempt < self._retries and await self._pause(attempt)):
                    raise
            except Exception as e:
                if not (self._retryable(e, attempt) and await self._pause(attempt)):
                    raise self._failure(e) from None
            else:
                return self._output(value)
            attempt += 1

    async def _stream(self, inputs: dict[str, Any]) -> AsyncIterator[Any]:
        """Yield the step's validated items; a failure before the first item may be retried, never after."""
        attempt, started = 0, False
        while True:
            gen = self._open(inputs)
            try:
                while True:
                    hop = _Attempt(self.step, self._timeout_s)
                    async with hop.limit():
                        try:
                            item = await gen.__anext__()
                        except StopAsyncIteration:
                            return
                    started = True
                    yield self._output(item)
            except Exception as e:
                if started or not (self._retryable(e, attempt) and await self._pause(attempt)):
                    raise self._failure(e) from None
            finally:
                await gen.aclose()  # type: ignore[attr-defined]
            attempt += 1

    async def map(self, items: Iterable[Any], concurrency: int = 8) -> list[Any]:
        """Call the step once per item (passed as its one argument), at most `concurrency` at a time, in order.

        The first failure cancels the calls still running and is raised as it is (one `ChainError`).
        """
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        sem = asyncio.Semaphore(concurrency)

        async def one(item: Any) -> Any:
            async with sem:
                return await _awaitable(self.run(item))

        tasks = [asyncio.ensure_future(one(item)) for item in items]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()


async def _awaitable(value: Awaitable[Any] | AsyncIterator[Any]) -> Any:
    if isinstance(value, AsyncIterator):
        return [x async for x in value]
    return await value

