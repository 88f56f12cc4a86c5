"""A replica that serves an LLM with the native engine behind the OpenAI API.

`EngineHost` has the same shape as `ModelHost` (load, health, call), so the replica server, its
limits, request ids and metrics are the same for a Python model and an LLM.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ballast.config import BallastConfig
from ballast.config.models import NativeEngineConfig
from ballast.observe import current_request_id
from ballast.openai import APIError
from ballast.openai.schemas import ChatCompletionRequest, CompletionRequest, parse_request
from ballast.package import Package
from ballast.runtime.model import LoadState

log = logging.getLogger("ballast.runtime.llm")

TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10, 30)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class LLMMetrics:
    def __init__(self, registry: CollectorRegistry, stats: Callable[[], dict[str, Any]]):
        r = registry
        self.ttft = Histogram("ballast_llm_time_to_first_token_seconds", "Time to first token.",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.itl = Histogram("ballast_llm_inter_token_latency_seconds", "Time between output tokens.",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("ballast_llm_e2e_request_latency_seconds", "Whole request latency.",
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("ballast_llm_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.cached_tokens = Counter("ballast_llm_cached_prompt_tokens", "Prompt tokens served from the prefix cache.",
                                     registry=r)
        self.generation_tokens = Counter("ballast_llm_generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter("ballast_llm_requests_finished", "Finished requests by reason.", ["reason"], registry=r)
        for name, key, doc in (
            ("ballast_llm_requests_running", "running", "Sequences in the running batch."),
            ("ballast_llm_requests_waiting", "waiting", "Sequences waiting to be scheduled."),
            ("ballast_llm_kv_cache_usage", "kv_cache_usage", "Fraction of KV cache blocks in use."),
            ("ballast_llm_prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
            ("ballast_llm_prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the cache."),
        ):
            Gauge(name, doc, registry=r).set_function(lambda k=key: float(stats().get(k, 0)))

        def hit_rate() -> float:
            s = stats()
            q = s.get("prefix_cache_queries", 0)
            return float(s.get("prefix_cache_hits", 0)) / q if q else 0.0

        Gauge("ballast_llm_prefix_cache_hit_rate", "Prefix cache hits / queries (tokens).", registry=r).set_function(
            hit_rate
        )


class EngineHost:
    """Loads the native engine for a package with `engine.kind: native` and serves the OpenAI API."""

    def __init__(self, package: Package):
        assert isinstance(package.config.engine, NativeEngineConfig)
        self.package = package
        self.cfg: NativeEngineConfig = package.config.engine
        self.state = LoadState.LOADING
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.engine: Any = None
        self.model_name = self.cfg.served_model_name or package.name
        self.metrics: LLMMetrics | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    async def load(self) -> None:
        started = time.monotonic()
        try:
            from ballast.engine import AsyncEngine, EngineArgs

            args = await asyncio.to_thread(EngineArgs.from_config, self.cfg, self.package.path)
            self.engine = await asyncio.to_thread(AsyncEngine, args)
            await self.engine.start()
            self.load_seconds = time.monotonic() - started
            self.state = LoadState.READY
            log.info("engine for %s ready in %.1fs (max_model_len=%s)", self.model_name, self.load_seconds,
                     self.engine.max_model_len)
        except Exception as e:
            self.state = LoadState.FAILED
            self.error = f"{type(e).__name__}: {e}"
            log.exception("engine failed to load")

    async def shutdown(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown()

    def has(self, name: str) -> bool:
        return name in ("chat_completions", "completions")

    def cancellable(self, name: str) -> bool:
        """A cancelled call aborts its engine request and frees its KV blocks."""
        return True

    async def healthy(self) -> tuple[bool, str | None]:
        if self.state is not LoadState.READY:
            return False, self.state.value if self.error is None else f"load failed: {self.error}"
        return True, None

    def bind_metrics(self, registry: CollectorRegistry) -> None:
        self.metrics = LLMMetrics(registry, lambda: self.engine.stats() if self.engine is not None else {})

    def extra_routes(self) -> list[tuple[str, Callable[[Request], Awaitable[Response]], list[str]]]:
        return [
            ("/v1/models", self._models, ["GET"]),
            ("/tokenize", self._tokenize, ["POST"]),
            ("/detokenize", self._detokenize, ["POST"]),
        ]

    async def predict(self, inputs: Any) -> Any:  # pragma: no cover - has("predict") is False
        raise APIError(404, "LLM replicas serve /v1/chat/completions and /v1/completions")

    # ---- small routes ----------------------------------------------------------------------
    def _require_ready(self) -> None:
        if self.state is not LoadState.READY:
            raise APIError(503, f"the engine is not ready ({self.error or self.state.value})", code="model_loading",
                           headers={"Retry-After": "2"})

    async def _models(self, _req: Request) -> Response:
        created = int(time.time() - (time.monotonic() - (self.load_seconds or 0)))
        data = [{"id": self.model_name, "object": "model", "created": created, "owned_by": "ballast",
                 "max_model_len": getattr(self.engine, "max_model_len", None)}]
        return JSONResponse({"object": "list", "data": data})

    async def _tokenize(self, request: Request) -> Response:
        self._require_ready()
        body = await request.json()
        if "messages" in body:
            req = parse_request(ChatCompletionRequest, {"model": body.get("model"), "messages": body["messages"]})
            text = self._render(req)
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise APIError(400, "send `prompt` (a string) or `messages`", param="prompt")
        ids = self.engine.tokenizer.encode(text)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_model_len})

    async def _detokenize(self, request: Request) -> Response:
        self._require_ready()
        body = await request.json()
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise APIError(400, "`tokens` must be a list of integers", param="tokens")
        vocab = self.engine.tokenizer.vocab_size
        bad = [t for t in tokens if t < 0 or t >= vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        return JSONResponse({"prompt": self.engine.tokenizer.decode(tokens)})

    # ---- OpenAI completions ----------------------------------------------------------------
    def _check_model(self, name: str | None) -> None:
        if name and name not in (self.model_name, self.package.name):
            raise APIError(404, f"the model `{name}` does not exist; this replica serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def _render(self, req: ChatCompletionRequest) -> str:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            return self.engine.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:
            raise APIError(400, f"the chat template could not render these messages: {e}", param="messages") from None

    def _params(self, req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None, logprobs: int | None):
        from ballast.engine import SamplingParams

        kw: dict[str, Any] = {
            "n": req.n,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "stop": req.stop_list(),
            "seed": req.seed,
            "presence_penalty": req.presence_penalty or 0.0,
            "frequency_penalty": req.frequency_penalty or 0.0,
            "ignore_eos": req.ignore_eos,
            "stop_token_ids": list(req.stop_token_ids or []),
            "logprobs": logprobs,
        }
        if max_tokens is not None:
            kw["max_tokens"] = max_tokens
        if req.top_k is not None:
            kw["top_k"] = req.top_k
        if req.min_p is not None:
            kw["min_p"] = req.min_p
        if req.repetition_penalty is not None:
            kw["repetition_penalty"] = req.repetition_penalty
        try:
            return SamplingParams(**kw)
        except ValueError as e:
            raise APIError(400, str(e), code=getattr(e, "code", None) or "invalid_request") from None

    async def call(self, name: str, body: Any) -> Any:
        self._require_ready()
        if name == "chat_completions":
            req = parse_request(ChatCompletionRequest, body)
            self._check_model(req.model)
            prompt: str | list[int] = self._render(req)
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            return await self._generate(req, [prompt], req.max_new_tokens(), logprobs, chat=True)
        if name == "completions":
            req2 = parse_request(CompletionRequest, body)
            self._check_model(req2.model)
            return await self._generate(req2, req2.prompts(), req2.max_new_tokens(), req2.logprobs, chat=False)
        raise APIError(404, f"{name} is not served by an LLM replica")

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        limit = self.engine.max_model_len
        if len(ids) >= limit:
            raise APIError(
                400,
                f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} tokens",
                param="messages" if isinstance(prompt, str) else "prompt", code="context_length_exceeded",
            )
        return ids

    async def _generate(
        self, req: Any, prompts: list[str | list[int]], max_tokens: int | None, logprobs: int | None, *, chat: bool
    ) -> Any:
        prompt_ids = [self._prompt_ids(p) for p in prompts]
        rid = current_request_id()
        base = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        streams = []
        for i, ids in enumerate(prompt_ids):
            room = self.engine.max_model_len - len(ids)
            mt = min(max_tokens, room) if max_tokens is not None else room
            if max_tokens is not None and max_tokens > room:
                raise APIError(
                    400,
                    f"this model's maximum context length is {self.engine.max_model_len} tokens; the prompt has "
                    f"{len(ids)} tokens and max_tokens asks for {max_tokens} more",
                    param="max_tokens", code="context_length_exceeded",
                )
            params = self._params(req, mt, logprobs)
            streams.append(self._run_one(f"{rid}-{i}", ids, params))
        if req.stream:
            return self._stream(streams, req, base, created, chat=chat)
        return await self._collect(streams, req, base, created, chat=chat)

    async def _run_one(self, request_id: str, ids: list[int], params: Any) -> AsyncIterator[Any]:
        """One engine request; records token timing metrics; aborts in the engine if abandoned."""
        started = time.monotonic()
        last = None
        out = None
        m = self.metrics
        gen = self.engine.add_request(request_id, ids, params)
        try:
            async for out in gen:
                now = time.monotonic()
                ntok = sum(len(c.token_ids) for c in out.outputs)
                if ntok and m:
                    if last is None:
                        m.ttft.observe(now - started)
                    else:
                        m.itl.observe((now - last) / ntok)
                    m.generation_tokens.inc(ntok)
                if ntok:
                    last = now
                yield out
        except ValueError as e:  # the engine refused the request (EngineError)
            code = getattr(e, "code", None) or "invalid_request"
            raise APIError(400, str(e), code=code) from None
        finally:
            if out is None or not out.finished:
                self.engine.abort(request_id)
            elif m:
                m.e2e.observe(time.monotonic() - started)
                m.prompt_tokens.inc(len(out.prompt_token_ids))
                m.cached_tokens.inc(out.num_cached_tokens or 0)
                for c in out.outputs:
                    m.finished.labels(c.finish_reason or "unknown").inc()
            await gen.aclose()

    @staticmethod
    def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _logprobs(self, lp: Any, chat: bool) -> Any:
        """Engine logprob entries → the OpenAI shape (chat: content list; completions: parallel arrays)."""
        if not lp:
            return [] if chat else {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        entries = []
        for e in lp:
            token = e["token"] if isinstance(e, dict) else e.token
            logprob = e["logprob"] if isinstance(e, dict) else e.logprob
            top = e.get("top_logprobs", []) if isinstance(e, dict) else e.top_logprobs
            entries.append((token, logprob, top))
        if chat:
            return [
                {"token": t, "logprob": p, "bytes": list(t.encode()),
                 "top_logprobs": [{"token": tt, "logprob": tp, "bytes": list(tt.encode())} for tt, tp in top]}
                for t, p, top in entries
            ]
        return {
            "tokens": [t for t, _, _ in entries],
            "token_logprobs": [p for _, p, _ in entries],
            "top_logprobs": [dict(top) for _, _, top in entries],
            "text_offset": [],
        }

    async def _collect(self, streams: list[AsyncIterator[Any]], req: Any, base: str, created: int, *, chat: bool):
        try:
            return await self._collect_all(streams, req, base, created, chat=chat)
        finally:
            for s in streams:
                await s.aclose()

    async def _collect_all(
        self, streams: list[AsyncIterator[Any]], req: Any, base: str, created: int, *, chat: bool
    ) -> dict[str, Any]:
        n = req.n
        choices: list[dict[str, Any]] = []
        prompt_tokens = completion_tokens = cached = 0
        for p_index, stream in enumerate(streams):
            texts = [""] * n
            finish: list[str | None] = [None] * n
            lps: list[list[Any]] = [[] for _ in range(n)]
            last = None
            async for out in stream:
                last = out
                for c in out.outputs:
                    texts[c.index] += c.text
                    completion_tokens += len(c.token_ids)
                    if c.finish_reason:
                        finish[c.index] = c.finish_reason
                    if c.logprobs:
                        lps[c.index].extend(c.logprobs)
            if last is not None:
                prompt_tokens += len(last.prompt_token_ids)
                cached += last.num_cached_tokens or 0
            for i in range(n):
                index = p_index * n + i
                if chat:
                    choice = {"index": index, "message": {"role": "assistant", "content": texts[i]},
                              "logprobs": {"content": self._logprobs(lps[i], True)} if req.logprobs else None,
                              "finish_reason": finish[i] or "stop"}
                else:
                    choice = {"index": index, "text": texts[i],
                              "logprobs": self._logprobs(lps[i], False) if req.logprobs is not None else None,
                              "finish_reason": finish[i] or "stop"}
                choices.append(choice)
        return {
            "id": base,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": self.model_name,
            "choices": choices,
            "usage": self._usage(prompt_tokens, completion_tokens, cached),
            "system_fingerprint": None,
        }

    async def _stream(
        self, streams: list[AsyncIterator[Any]], req: Any, base: str, created: int, *, chat: bool
    ) -> AsyncIterator[dict[str, Any]]:
        """Chunks in OpenAI's order: role first, content deltas, one finish_reason per choice, usage last."""
        try:
            async for c in self._chunks(streams, req, base, created, chat=chat):
                yield c
        finally:  # a client that went away aborts its engine requests here
            for s in streams:
                await s.aclose()

    async def _chunks(
        self, streams: list[AsyncIterator[Any]], req: Any, base: str, created: int, *, chat: bool
    ) -> AsyncIterator[dict[str, Any]]:
        n = req.n
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            c = {"id": base, "object": obj, "created": created, "model": self.model_name, "choices": choices}
            if include_usage:
                c["usage"] = None
            return c

        if chat:
            yield chunk([{"index": p * n + i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for p in range(len(streams)) for i in range(n)])
        prompt_tokens = completion_tokens = cached = 0
        for p_index, stream in enumerate(streams):
            last = None
            async for out in stream:
                last = out
                parts = []
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    if not c.text and not c.finish_reason:
                        continue
                    index = p_index * n + c.index
                    if chat:
                        parts.append({"index": index, "delta": {"content": c.text} if c.text else {},
                                      "logprobs": {"content": self._logprobs(c.logprobs, True)} if req.logprobs
                                      else None, "finish_reason": c.finish_reason})
                    else:
                        parts.append({"index": index, "text": c.text,
                                      "logprobs": self._logprobs(c.logprobs, False) if req.logprobs is not None
                                      else None, "finish_reason": c.finish_reason})
                if parts:
                    yield chunk(parts)
            if last is not None:
                prompt_tokens += len(last.prompt_token_ids)
                cached += last.num_cached_tokens or 0
        if include_usage:
            yield {"id": base, "object": obj, "created": created, "model": self.model_name, "choices": [],
                   "usage": self._usage(prompt_tokens, completion_tokens, cached)}


def engine_default_concurrency(config: BallastConfig) -> int:
    """An engine batches requests itself: admit many at once unless the package says otherwise."""
    if "predict_concurrency" in config.runtime.model_fields_set:
        return config.runtime.predict_concurrency
    eng = config.engine
    return max(256, 4 * eng.max_num_seqs) if isinstance(eng, NativeEngineConfig) else 256
