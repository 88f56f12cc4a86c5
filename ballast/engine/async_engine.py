"""The async API: the engine steps in a background thread; each request is an async iterator.

The event loop never runs model code. Requests and aborts are handed to the engine thread through
a queue and applied between steps; outputs come back with `call_soon_threadsafe`. The thread never
dies of one request (the core fails that request alone); if it dies anyway, or stops making progress
while work waits, `health()` says so and every waiting caller gets an error instead of hanging.

All torch work of a replica runs on this one thread: it builds the engine (model, weights, KV cache)
and every other tensor job comes to it through `call`. Measured (bench/ttft.py's docstring): an
engine built on one thread and stepped on another owns two OpenMP teams; libgomp then counts more
threads than cores and cuts its spin-wait from 300000 to 1000 iterations, so on 2 cores the worker
slept on a futex after every parallel region (~1100 sleeps and wake-ups per 140-token prefill) and the
replica's TTFT was 1.6x the same forward in a plain process.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from ballast.engine.adapters import resolve
from ballast.engine.config import EngineArgs
from ballast.engine.engine import LLMEngine
from ballast.engine.errors import EngineError, EngineInternalError
from ballast.engine.sequence import RequestOutput, SamplingParams

log = logging.getLogger("ballast.engine")
T = TypeVar("T")


class AsyncEngine:
    def __init__(self, args: EngineArgs):
        """Starts the engine thread and blocks until it has built the engine (call it off the event loop);
        steps begin at `start()`."""
        self.stall_timeout_s = args.stall_timeout_s
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._started = threading.Event()
        self._stop = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._calls: set[asyncio.Future[Any]] = set()  # `call`s not yet answered
        self._beat = time.monotonic()  # last time the engine thread made progress
        self._busy = False  # the engine thread has requests in flight
        self.dead: str | None = None  # why the engine thread stopped, if it did
        built: list[LLMEngine | BaseException] = []
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(args, built, ready), name="ballast-engine",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        if isinstance(built[0], BaseException):
            self._thread.join()
            raise built[0]
        self.core: LLMEngine = built[0]
        self.tokenizer = self.core.tokenizer
        self.max_model_len = self.core.max_model_len
        self.model_name = self.core.model_name

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._beat = time.monotonic()
        self._started.set()

    async def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._started.set()
        await asyncio.to_thread(self._thread.join, 30)
        self._fail_waiters("the engine shut down")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the engine thread, between steps: tensor work off the engine thread would start a
        second OpenMP team (see the module docstring). Its exception is raised here."""
        if self.dead is not None:
            raise EngineInternalError(f"the engine is down ({self.dead})")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._calls.add(fut)
        self._commands.put(("call", (fn, args, fut)))
        self._wake.set()
        try:
            return await fut
        finally:
            self._calls.discard(fut)

    def health(self, now: float | None = None) -> tuple[bool, str | None]:
        """(False, why) when the engine thread died, or made no progress for stall_timeout_s while work waited."""
        if self.dead is not None:
            return False, f"engine thread died: {self.dead}"
        if self._thread is not None and not self._thread.is_alive() and not self._stop:
            return False, "engine thread exited"
        waiting = self._started.is_set() and (self._busy or not self._commands.empty())
        idle = (time.monotonic() if now is None else now) - self._beat
        if waiting and idle > self.stall_timeout_s:
            return False, f"engine stuck: no step for {idle:.0f}s with {len(self._queues)} requests waiting"
        return True, None

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt, **extra)

    def sampling_params(self, **given: Any) -> SamplingParams:
        return self.core.sampling_params(**given)

    def compile_grammar(self, spec: Any) -> Any:
        """A `guided.Grammar` for `params.guided`; call it off the event loop (it may compile)."""
        return self.core.grammars.compile(spec)

    def stats(self) -> dict[str, float]:
        return self.core.stats()

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """Check and submit now (an EngineError is raised here); iterate for incremental outputs until the
        request finishes. Closing the iterator early aborts the request. `lora`: a registered adapter's name,
        resolved here, so an adapter unloaded after this call still serves the request."""
        if self.dead is not None:
            raise EngineInternalError(f"the engine is down ({self.dead})", request_id)
        ref = resolve(self.core.adapters, lora)
        ids = self.core.check_request(prompt, params)
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request_id] = q
        self._commands.put(("add", (request_id, ids, params, ref, time.time_ns())))
        self._wake.set()
        return self._outputs(request_id, q)

    async def _outputs(self, request_id: str, q: asyncio.Queue[RequestOutput]) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                out = await q.get()
                if out.error:
                    finished = True
                    if out.error_code:
                        raise EngineError(out.error, out.error_code)
                    raise EngineInternalError(out.error, request_id)
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    # ---- engine thread ---------------------------------------------------------------------
    def _deliver(self, out: RequestOutput) -> None:
        q = self._queues.get(out.request_id)
        if q is not None:
            q.put_nowait(out)

    def _send(self, outputs: list[RequestOutput]) -> None:
        loop = self._loop
        assert loop is not None
        for out in outputs:
            loop.call_soon_threadsafe(self._deliver, out)

    def _fail_waiters(self, message: str) -> None:
        for rid, q in list(self._queues.items()):  # nobody waits forever on a stopped engine
            q.put_nowait(RequestOutput(rid, [], [], finished=True, error=message))
        for fut in list(self._calls):
            _settle(fut, None, EngineInternalError(message))

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                rid, ids, params, ref, queued_ns = arg
                try:
                    self.core.add_request(rid, ids, params, lora=ref, queued_ns=queued_ns)
                except EngineError as e:
                    self._send([RequestOutput(rid, ids, [], finished=True, error=str(e), error_code=e.code)])
                except Exception as e:  # the engine's fault, but this request's alone
                    log.exception("request %s could not be added", rid)
                    self._send([RequestOutput(rid, ids, [], finished=True,
                                              error=f"the engine failed on request {rid} ({type(e).__name__})")])
            elif kind == "abort":
                try:
                    self.core.abort(arg)
                except Exception:
                    log.exception("abort of %s failed", arg)
            elif kind == "call":
                self._call(*arg)

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...], fut: asyncio.Future[Any]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            result = fn(*args)
        except Exception as e:
            loop.call_soon_threadsafe(_settle, fut, None, e)
        else:
            loop.call_soon_threadsafe(_settle, fut, result, None)

    def _run(self, args: EngineArgs, built: list[LLMEngine | BaseException], ready: threading.Event) -> None:
        try:
            built.append(LLMEngine(args))
        except BaseException as e:  # raised to the constructor's caller
            built.append(e)
            return
        finally:
            ready.set()
        self._started.wait()
        try:
            self._loop_forever()
        except BaseException as e:
            self.dead = f"{type(e).__name__}: {e}"
            log.critical("engine thread died", exc_info=True)
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._fail_waiters, f"the engine stopped ({self.dead})")

    def _loop_forever(self) -> None:
        while not self._stop:
            self._beat = time.monotonic()
            self._apply_commands()
            self._busy = self.core.has_work()
            if not self._busy:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.core.step()
            except Exception as e:  # not attributable: every request fails, the engine goes on clean
                log.exception("engine step crashed; failing all %d requests", len(self.core.requests))
                outputs = self.core.fail_all(e)
            self._send(outputs)


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # the caller went away
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
