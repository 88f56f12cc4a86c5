"""Engine outputs → OpenAI responses: whole completions, streamed chunks, usage and logprobs.

Pure formatting, apart from the engine: `EngineHost` submits the requests and hands their output
streams here. Choice `index` is `prompt_index * n + i`, as OpenAI numbers them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from ballast.runtime.llm_resume import REPORT_KEY


class OutputStream(Protocol):
    """One engine request's outputs (see `llm_host.EngineStream`)."""

    def __aiter__(self) -> AsyncIterator[Any]: ...

    async def aclose(self) -> None: ...


def usage(prompt: int, completion: int, cached: int, speculative: dict[str, Any] | None = None) -> dict[str, Any]:
    u = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    if speculative:  # an extra (vLLM-style): this request's drafts and acceptance when it speculated
        u["speculative"] = speculative
    return u


def format_logprobs(lp: Any, chat: bool) -> Any:
    """Engine logprob entries → the OpenAI shape (chat: content list; completions: parallel arrays)."""
    if not lp:
        return [] if chat else {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    entries = [(e.token, e.logprob, e.top_logprobs) for e in lp]
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


class Formatter:
    """Shapes one API request's engine streams as a chat completion or a text completion."""

    def __init__(self, req: Any, model_name: str, response_id: str, created: int, *, chat: bool, kept: int = 0,
                 report: bool = False):
        self.req = req
        self.kept = kept  # prompt tokens that are answer already sent (a resumed stream): usage counts them once
        self.report = report  # attach each chunk's token ids (llm_resume.reporting frames them)
        self.model = model_name
        self.id = response_id
        self.created = created
        self.chat = chat
        self.want_logprobs = bool(req.logprobs) if chat else req.logprobs is not None

    def _choice_logprobs(self, lp: Any) -> Any:
        if not self.want_logprobs:
            return None
        return {"content": format_logprobs(lp, True)} if self.chat else format_logprobs(lp, False)

    async def collect(self, streams: Sequence[OutputStream]) -> dict[str, Any]:
        try:
            return await self._collect(streams)
        finally:
            for s in streams:
                await s.aclose()

    async def _collect(self, streams: Sequence[OutputStream]) -> dict[str, Any]:
        n = self.req.n
        choices: list[dict[str, Any]] = []
        prompt_tokens = completion_tokens = cached = 0
        spec: dict[str, Any] | None = None
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
                spec = getattr(last, "speculative", None) or spec
            for i in range(n):
                choice: dict[str, Any] = {"index": p_index * n + i}
                if self.chat:
                    choice["message"] = {"role": "assistant", "content": texts[i]}
                else:
                    choice["text"] = texts[i]
                choice["logprobs"] = self._choice_logprobs(lps[i])
                choice["finish_reason"] = finish[i] or "stop"
                choices.append(choice)
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self._usage(prompt_tokens, completion_tokens, cached, spec),
            "system_fingerprint": None,
        }

    async def stream(self, streams: Sequence[OutputStream]) -> AsyncIterator[dict[str, Any]]:
        """Chunks in OpenAI's order: role first, content deltas, one finish_reason per choice, usage last."""
        try:
            async for c in self._chunks(streams):
                yield c
        finally:  # a client that went away aborts its engine requests here
            for s in streams:
                await s.aclose()

    async def _chunks(self, streams: Sequence[OutputStream]) -> AsyncIterator[dict[str, Any]]:
        n = self.req.n
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            return self._chunk(obj, choices, include_usage)

        if self.chat:
            yield chunk(self._role_parts(len(streams)))
        prompt_tokens = completion_tokens = cached = 0
        ids: list[int] = []  # token ids not yet reported with a chunk
        for p_index, stream in enumerate(streams):
            last = None
            async for out in stream:
                last = out
                parts = []
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    ids += c.token_ids if self.report else ()
                    part = self._stream_part(p_index * n + c.index, c)
                    if part is not None:
                        parts.append(part)
                if parts:
                    yield self._reported(chunk(parts), ids, len(out.prompt_token_ids))
                    ids = []
            if last is not None:
                prompt_tokens += len(last.prompt_token_ids)
                cached += last.num_cached_tokens or 0
        if include_usage:
            yield {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [],
                   "usage": self._usage(prompt_tokens, completion_tokens, cached)}

    def _usage(self, prompt: int, completion: int, cached: int, spec: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole answer's usage: a resumed stream's prompt holds `kept` tokens of answer already sent."""
        return usage(prompt - self.kept, completion + self.kept, min(cached, prompt - self.kept), spec)

    def _reported(self, chunk: dict[str, Any], ids: list[int], prompt: int) -> dict[str, Any]:
        if self.report:
            chunk[REPORT_KEY] = {"ids": ids, "p": prompt - self.kept}
        return chunk

    def _stream_part(self, index: int, c: Any) -> dict[str, Any] | None:
        """One choice's delta in a chunk; None when it has neither text nor a finish to report."""
        if not c.text and not c.finish_reason:
            return None
        part: dict[str, Any] = {"index": index}
        if self.chat:
            part["delta"] = {"content": c.text} if c.text else {}
        else:
            part["text"] = c.text
        part["logprobs"] = self._choice_logprobs(c.logprobs)
        part["finish_reason"] = c.finish_reason
        return part

    def _chunk(self, obj: str, choices: list[dict[str, Any]], include_usage: bool) -> dict[str, Any]:
        """A streamed chunk; with `include_usage` every chunk carries `usage: null`, as OpenAI's do."""
        c = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if include_usage:
            c["usage"] = None
        return c

    def _role_parts(self, prompts: int) -> list[dict[str, Any]]:
        """The first chat chunk's choices: every choice's role, before any content."""
        n = self.req.n
        return [{"index": p * n + i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for p in range(prompts) for i in range(n)]
