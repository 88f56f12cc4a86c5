"""A replica that serves an LLM with the native engine behind the OpenAI API.

`EngineHost` has the same shape as `ModelHost` (load, health, call), so the replica server, its
limits, request ids and metrics are the same for a Python model and an LLM. Requests are validated
at the edge (`ballast.openai.schemas`), checked against the model by the engine alone (vocabulary,
context length), and shaped into responses by `llm_format`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ballast.config.models import NativeEngineConfig
from ballast.observe import current_request_id
from ballast.openai import APIError
from ballast.openai.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_request,
)
from ballast.openai.tools import ToolRequest, parse_tools
from ballast.package import Package
from ballast.runtime import llm_trace, responses
from ballast.runtime.engine_args import engine_args
from ballast.runtime.host import request_priority, stream_tokens
from ballast.runtime.llm_format import Formatter
from ballast.runtime.llm_guided import attach
from ballast.runtime.llm_lora import LoraRoutes
from ballast.runtime.llm_metrics import LLMMetrics
from ballast.runtime.llm_resume import budget, prompt_with_ids, render_head, reporting, resume_ids
from ballast.runtime.llm_tools import (
    apply_to_response,
    apply_to_stream,
    choose_parser,
    forced_spec,
    template_messages,
)
from ballast.runtime.llm_trace import RequestTrace
from ballast.runtime.model import LoadState, _load_secrets

log = logging.getLogger("ballast.runtime.llm")


def _priority(req: ChatCompletionRequest | CompletionRequest) -> int | None:
    """The x-ballast-priority header when sent (the platform's word on queued work), else the body's field."""
    header = request_priority.get()
    return header if header is not None else req.priority


def _api_error(e: Exception, chat: bool) -> APIError:
    """Engine errors → API errors: the client's fault is a 400 with its code, the engine's a 500."""
    from ballast.engine import EngineError

    if isinstance(e, EngineError):
        param = e.param
        if param == "messages" and not chat:
            param = "prompt"
        return APIError(400, str(e), code=e.code, param=param)
    return APIError(500, f"{e}; see the replica log", code="engine_error")


class EngineStream:
    """One engine request's outputs; records token timing metrics (and, when traced, its span data); closing it
    early aborts the request."""

    def __init__(self, host: EngineHost, request_id: str, outputs: AsyncIterator[Any], *, chat: bool,
                 adapter: str | None = None, trace: RequestTrace | None = None):
        self.host = host
        self.adapter = adapter
        self.request_id = request_id
        self.chat = chat
        self.trace = trace
        self._outputs = outputs
        self._started = time.monotonic()
        self._done = False

    async def __aiter__(self) -> AsyncIterator[Any]:
        m = self.host.metrics
        last = first = None
        out = None
        total = 0
        reasons: list[str] = []
        try:
            async for out in self._outputs:
                now = time.monotonic()
                ntok = sum(len(c.token_ids) for c in out.outputs)
                if ntok and m:
                    if last is None:
                        m.observe_first_token(now - self._started, self.chat)
                    else:
                        m.itl.observe((now - last) / ntok)
                    m.generation_tokens.inc(ntok)
                if ntok:
                    first = first or now
                    last = now
                    total += ntok
                if self.trace is not None:
                    reasons += [c.finish_reason for c in out.outputs if c.finish_reason]
                yield out
        except Exception as e:
            self._done = True
            raise _api_error(e, self.chat) from None
        if out is not None and out.finished:
            self._done = True
            self._finished(out, total, first, last, reasons)

    def _finished(self, out: Any, total: int, first: float | None, last: float | None, reasons: list[str]) -> None:
        m = self.host.metrics
        if m:
            per_token = (last - first) / (total - 1) if first is not None and last is not None and total > 1 else None
            m.observe_finished(out, time.monotonic() - self._started, total, per_token, self.chat)
        self.host.lora.count(self.adapter, total)
        if self.trace is not None:
            self.trace.finished(out, total, reasons)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self.host.engine.abort(self.request_id)
        await self._outputs.aclose()  # type: ignore[attr-defined]

class EngineHost:
    """Loads the native engine for a package with `engine.kind: native` and serves the OpenAI API."""

    def __init__(self, package: Package):
        assert isinstance(package.config.engine, NativeEngineConfig)
        self.package = package
        self.cfg: NativeEngineConfig = package.config.engine
        self._state = LoadState.LOADING
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.engine: Any = None
        # The served name is decided once, in engine_args; the engine reports the same.
        self.model_name: str = engine_args(self.cfg, package.path, package_name=package.name,
                                           resolve=False).served_model_name or package.name
        self.metrics: LLMMetrics | None = None
        self.lora = LoraRoutes(self)

    @property
    def state(self) -> LoadState:
        """FAILED once the engine thread died or is stuck, so /health/live fails too and the platform
        replaces the replica (the server reads `state` for liveness and calls `healthy()` for readiness)."""
        if self._state is LoadState.READY and self.engine is not None:
            ok, reason = self.engine.health()
            if not ok:
                log.error("engine unhealthy: %s", reason)
                self._state, self.error = LoadState.FAILED, reason
        return self._state

    @state.setter
    def state(self, value: LoadState) -> None:
        self._state = value

    # ---- lifecycle -------------------------------------------------------------------------
    async def load(self) -> None:
        started = time.monotonic()
        try:
            from ballast.engine import AsyncEngine

            token = _load_secrets(["HF_TOKEN"])["HF_TOKEN"] if "HF_TOKEN" in self.package.config.secrets else None
            args = await asyncio.to_thread(engine_args, self.cfg, self.package.path, package_name=self.package.name,
                                           hf_token=token)
            self.engine = await asyncio.to_thread(AsyncEngine, args)
            self.model_name = self.engine.model_name
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
        return name in ("chat_completions", "completions", "responses")

    def cancellable(self, name: str) -> bool:
        """A cancelled call aborts its engine request and frees its KV blocks."""
        return True

    async def healthy(self) -> tuple[bool, str | None]:
        """Not ready while loading; failed (live and ready both fail, so the platform replaces the replica)
        once the engine thread died or stopped making progress with requests waiting."""
        if self.state is not LoadState.READY:
            return False, self.state.value if self.error is None else f"engine failed: {self.error}"
        return True, None

    def bind_metrics(self, registry: CollectorRegistry) -> None:
        self.metrics = LLMMetrics(registry, lambda: self.engine.stats() if self.engine is not None else {},
                                  lambda: self.model_name)
        self.lora.bind_metrics(registry)

    def extra_routes(self) -> list[tuple[str, Callable[[Request], Awaitable[Response]], list[str]]]:
        return [
            ("/v1/models", self._models, ["GET"]),
            ("/tokenize", self._tokenize, ["POST"]),
            ("/detokenize", self._detokenize, ["POST"]),
            *self.lora.routes(),
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
                 "max_model_len": getattr(self.engine, "max_model_len", None),
                 "capabilities": self._capabilities()}, *self.lora.models(created)]
        return JSONResponse({"object": "list", "data": data})

    def _capabilities(self) -> dict[str, Any] | None:
        """What a client may ask of this model: constraints, the tool-call format, the Responses API, and the
        sampling a request that omits a parameter gets (the checkpoint's generation_config.json + the package's)."""
        if self.engine is None:
            return None
        core = self.engine.core
        return {
            "structured_outputs": {
                "response_format": ["json_object", "json_schema"],
                "extra_body": ["guided_json", "guided_regex", "guided_choice", "structured_outputs"]},
            "tool_calling": {"tool_parser": choose_parser(self.engine.tokenizer.chat_template, self.cfg.tool_parser),
                             "tool_choice": ["auto", "none", "required", "function"], "parallel_tool_calls": True},
            "responses_api": {"store": False},
            "default_sampling": {**core.default_sampling, "max_tokens": core.default_max_tokens},
        }

    async def _body(self, request: Request) -> Any:
        from ballast.runtime.server import read_json

        self._require_ready()
        return await read_json(request, self.package.config.runtime.max_request_bytes)

    async def _tokenize(self, request: Request) -> Response:
        req = parse_request(TokenizeRequest, await self._body(request))
        self._check_model(req.model)
        if (req.messages is None) == (req.prompt is None):
            raise APIError(400, "send `prompt` (a string) or `messages`, not both", param="prompt")
        parser = choose_parser(self.engine.tokenizer.chat_template, self.cfg.tool_parser)  # as chat renders them
        text = self._render(req.messages, None, parser) if req.messages is not None else req.prompt
        ids = self.engine.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_model_len})

    async def _detokenize(self, request: Request) -> Response:
        req = parse_request(DetokenizeRequest, await self._body(request))
        self._check_model(req.model)
        vocab = self.engine.tokenizer.vocab_size
        bad = [t for t in req.tokens if t >= vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        return JSONResponse({"prompt": self.engine.tokenizer.decode(req.tokens)})

    # ---- OpenAI completions ----------------------------------------------------------------
    def _check_model(self, name: str | None) -> str | None:
        """The LoRA adapter `name` selects (None: the base model); 404 for a model not served here."""
        return self.lora.resolve(name)

    def _render(self, messages: list[Any], tools: ToolRequest | None = None, parser: str = "hermes",
                add_generation_prompt: bool = True) -> str:
        msgs, extra = template_messages(messages, tools, self.engine.tokenizer.chat_template, parser)
        return self._template(msgs, add_generation_prompt, extra)

    def _template(self, msgs: list[dict[str, Any]], add_generation_prompt: bool, extra: dict[str, Any]) -> str:
        try:
            return self.engine.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, **extra)
        except Exception as e:
            raise APIError(400, f"the chat template could not render these messages: {e}", param="messages") from None

    def _chat_prompt(self, req: ChatCompletionRequest, tools: ToolRequest,
                     parser: str) -> tuple[str | list[int], int, int]:
        """(the prompt, how many of its tokens are answer already sent, how many the sender counted as sent):
        `continue_final_message` leaves the last assistant message open (llm_resume)."""
        if not req.continue_final_message:
            return self._render(req.messages, tools, parser, req.add_generation_prompt), 0, 0
        if req.add_generation_prompt:
            raise APIError(400, "continue_final_message needs add_generation_prompt: false",
                           param="add_generation_prompt")
        msgs, extra = template_messages(req.messages, tools, self.engine.tokenizer.chat_template, parser)
        head, content = render_head(lambda m, gen: self._template(m, gen, extra), msgs)
        resume = resume_ids(req.model_extra)
        ids = resume[0] if resume is not None else None
        prompt, kept = prompt_with_ids(self.engine.tokenizer, head, content, ids)
        return prompt, kept, len(ids or ())

    def _completion_prompts(self, req: CompletionRequest) -> tuple[list[str | list[int]], int, int]:
        """The prompts; with `ballast_resume`, the text prompt's last `chars` are answer already sent."""
        resume = resume_ids(req.model_extra)
        if resume is None:
            return req.prompts(), 0, 0
        ids, chars = resume
        if not isinstance(req.prompt, str) or chars > len(req.prompt):
            raise APIError(400, "ballast_resume needs one text prompt ending with `chars` characters of answer",
                           param="ballast_resume")
        cut = len(req.prompt) - chars
        prompt, kept = prompt_with_ids(self.engine.tokenizer, req.prompt[:cut], req.prompt[cut:], ids)
        return [prompt], kept, len(ids)

    def _params(self, req: ChatCompletionRequest | CompletionRequest, logprobs: int | None) -> Any:
        """What the request set; everything it omits comes from the engine's defaults."""
        try:
            return self.engine.sampling_params(
                n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, stop=req.stop_list() or None, seed=req.seed,
                ignore_eos=req.ignore_eos, stop_token_ids=req.stop_token_ids, logprobs=logprobs,
                max_tokens=req.max_new_tokens(), priority=_priority(req),
            )
        except ValueError as e:
            raise APIError(400, str(e), code=getattr(e, "code", None) or "invalid_request") from None

    async def call(self, name: str, body: Any) -> Any:
        self._require_ready()
        if name == "responses":  # the Responses API, run as a chat completion
            return await responses.create(body, lambda chat: self.call("chat_completions", chat), self.model_name)
        req: ChatCompletionRequest | CompletionRequest
        if name == "chat_completions":
            req = chat_req = parse_request(ChatCompletionRequest, body)
            adapter = self._check_model(req.model)
            x = chat_req.model_extra or {}
            tools = parse_tools(x.get("tools"), x.get("tool_choice"), x.get("parallel_tool_calls"))
            parser = choose_parser(self.engine.tokenizer.chat_template, self.cfg.tool_parser)
            prompt, kept, sent = self._chat_prompt(chat_req, tools, parser)
            prompts: list[str | list[int]] = [prompt]
            logprobs = (chat_req.top_logprobs or 0) if req.logprobs else None
            chat = True
        elif name == "completions":
            req = comp_req = parse_request(CompletionRequest, body)
            adapter = self._check_model(req.model)
            prompts, kept, sent = self._completion_prompts(comp_req)
            logprobs, chat = comp_req.logprobs, False
            tools, parser = ToolRequest(), "hermes"
        else:
            raise APIError(404, f"{name} is not served by an LLM replica")
        req = budget(req, sent, kept, getattr(getattr(self.engine, "core", None), "default_max_tokens", 1024))
        params = await attach(self.engine, req, self._params(req, logprobs), forced_spec(tools, parser))
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        served = adapter or self.model_name
        streams = self._submit(prompts, params, chat=chat, adapter=adapter,
                               trace=llm_trace.start(req, served, response_id, chat))
        report = req.stream and stream_tokens.get() and not tools.active
        fmt = Formatter(req, served, response_id, int(time.time()), chat=chat, kept=kept, report=report)
        if req.stream:
            if report:
                return reporting(fmt.stream(streams))
            return apply_to_stream(fmt.stream(streams), parser) if tools.active else fmt.stream(streams)
        resp = await fmt.collect(streams)
        return apply_to_response(resp, parser) if tools.active else resp

    def _submit(self, prompts: list[str | list[int]], params: Any, *, chat: bool,
                adapter: str | None = None, trace: RequestTrace | None = None) -> list[EngineStream]:
        """Every prompt goes to the engine at once (they batch together); any refused → none stays."""
        rid = current_request_id()
        streams: list[EngineStream] = []
        try:
            for i, prompt in enumerate(prompts):
                erid = f"{rid}-{i}"
                outputs = self.engine.add_request(erid, prompt, params, lora=adapter)
                streams.append(EngineStream(self, erid, outputs, chat=chat, adapter=adapter, trace=trace))
        except Exception as e:
            for s in streams:
                s._done = True
                self.engine.abort(s.request_id)
            raise _api_error(e, chat) from None
        return streams
