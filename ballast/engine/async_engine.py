"""The async API: the engine steps in a background thread; each request is an async iterator.

The event loop never runs model code. Requests and aborts are handed to the engine thread through
a queue and applied between steps; outputs come back with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from ballast.engine.config import EngineArgs, EngineError
from ballast.engine.engine import LLMEngine
from ballast.engine.sequence import RequestOutput, SamplingParams

log = logging.getLogger("ballast.engine")


class AsyncEngine:
    def __init__(self, args: EngineArgs):
        self.core = LLMEngine(args)
        self.tokenizer = self.core.tokenizer
        self.max_model_len = self.core.max_model_len
        self.model_name = self.core.model_name
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="ballast-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        for rid, q in list(self._queues.items()):  # nobody waits forever on a stopped engine
            q.put_nowait(RequestOutput(rid, [], [], finished=True, error="the engine shut down"))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt)

    def stats(self) -> dict[str, float]:
        return self.core.stats()

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams
                          ) -> AsyncIterator[RequestOutput]:
        """Yields incremental outputs until the request finishes; closing the iterator aborts it."""
        ids = self.core.encode_prompt(prompt)  # validation errors surface here, in the caller
        room = self.max_model_len - len(ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise EngineError(f"the prompt has {len(ids)} tokens and max_tokens asks for {params.max_tokens} more; "
                              f"the context holds {self.max_model_len}", "context_length_exceeded")
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request_id] = q
        self._commands.put(("add", (request_id, ids, params)))
        self._wake.set()
        finished = False
        try:
            while True:
                out = await q.get()
                if out.error:
                    finished = True
                    raise EngineError(out.error, "engine_error")
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

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                rid, ids, params = arg
                try:
                    self.core.add_request(rid, ids, params)
                except EngineError as e:
                    out = RequestOutput(rid, ids, [], finished=True, error=str(e))
                    self._loop.call_soon_threadsafe(self._deliver, out)  # type: ignore[union-attr]
            elif kind == "abort":
                self.core.abort(arg)

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        while not self._stop:
            self._apply_commands()
            if not self.core.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.core.step()
            except Exception:
                log.exception("engine step crashed")
                continue
            for out in outputs:
                loop.call_soon_threadsafe(self._deliver, out)
