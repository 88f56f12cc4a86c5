"""Request schemas of the OpenAI API that Ballast serves, validated with pydantic.

Responses are built as plain dicts on the hot path (they are simple and fixed); requests are
validated here so every replica and the gateway reject the same bad input with the same message.
Every numeric field is range-checked and strictly typed (no "1" for 1, no true for 1, no NaN), so
nothing out of range reaches the engine: a seed of 2**70 or a max_tokens of 10**30 is a 400 naming
the field, never an engine crash. Parameters Ballast does not support are refused with a clear 400,
never silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from ballast.openai.errors import APIError
from ballast.openai.priority import MAX_PRIORITY

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_TOKENS_LIMIT = 1 << 20  # far beyond any context; the engine checks the real one
TOKEN_ID_MAX = (1 << 31) - 1  # the engine checks the real vocabulary
MAX_JSON_DEPTH = 32  # the deepest legitimate request (content parts) is about 5
MAX_STOP_CHARS = 1024
_CONFIG = ConfigDict(extra="allow", allow_inf_nan=False)


class _Req(BaseModel):
    # Unknown fields are kept (SDKs add new ones); `unsupported()` names those we refuse.
    model_config = _CONFIG


class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: bool = Field(False, strict=True)


class ChatMessage(BaseModel):
    model_config = _CONFIG
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise APIError(400, f"content parts of type {part.get('type')!r} are not supported; send text",
                               param="messages")
            text = part.get("text", "")
            if not isinstance(text, str):
                raise APIError(400, "a text content part's `text` must be a string", param="messages")
            parts.append(text)
        return "".join(parts)


class _Sampling(_Req):
    model: str | None = Field(None, max_length=512)
    max_tokens: int | None = Field(None, strict=True, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, strict=True, ge=0, le=2)
    top_p: float | None = Field(None, strict=True, gt=0, le=1)
    n: int = Field(1, strict=True, ge=1, le=16)
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, strict=True, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(None, strict=True, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, strict=True, ge=-2, le=2)
    user: str | None = Field(None, max_length=512)
    # Extensions shared with vLLM.
    top_k: int | None = Field(None, strict=True, ge=-1, le=MAX_TOKENS_LIMIT)
    min_p: float | None = Field(None, strict=True, ge=0, le=1)
    # vLLM's scheduling priority, lower first; a replica's x-ballast-priority header overrides it.
    priority: int | None = Field(None, strict=True, ge=0, le=MAX_PRIORITY)
    repetition_penalty: float | None = Field(None, strict=True, ge=0.01, le=10)
    ignore_eos: bool = Field(False, strict=True)
    stop_token_ids: list[StrictInt] | None = Field(None, max_length=64)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not 1 <= len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(isinstance(t, bool) or not 0 <= t <= TOKEN_ID_MAX for t in v):
            raise ValueError(f"token ids must be integers in 0..{TOKEN_ID_MAX}")
        return v

    def stop_list(self) -> list[str]:
        return list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, strict=True, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = Field(False, strict=True)
    top_logprobs: int | None = Field(None, strict=True, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    # vLLM's extensions for continuing a partial assistant message (the gateway's mid-stream resume sends them).
    continue_final_message: bool = Field(False, strict=True)
    add_generation_prompt: bool = Field(True, strict=True)

    def unsupported(self) -> list[str]:
        out = []
        extra = self.model_extra or {}
        for key in ("functions", "logit_bias", "audio", "prediction"):  # tools: see ballast.openai.tools
            if extra.get(key):
                out.append(key)
        return out

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens



class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: int | None = Field(None, strict=True, ge=0, le=20)
    echo: bool = Field(False, strict=True)
    suffix: str | None = None
    best_of: int | None = Field(None, strict=True, ge=1, le=16)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not 1 <= len(v) <= 64:
                raise ValueError("send 1 to 64 prompts")
            flat = [t for x in v for t in (x if isinstance(x, list) else [x])]
            if any(isinstance(t, int) and (isinstance(t, bool) or not 0 <= t <= TOKEN_ID_MAX) for t in flat):
                raise ValueError(f"token ids must be integers in 0..{TOKEN_ID_MAX}")
            if any(isinstance(x, list) and not x for x in v):
                raise ValueError("a prompt of token ids must not be empty")
        return v

    def unsupported(self) -> list[str]:
        out = []
        if self.suffix:
            out.append("suffix")
        if self.best_of not in (None, self.n):
            out.append("best_of")
        if self.echo:
            out.append("echo")
        extra = self.model_extra or {}
        out += [key for key in ("tools", "functions", "tool_choice", "logit_bias") if extra.get(key)]
        return out

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class TokenizeRequest(_Req):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: str | None = Field(None, max_length=512)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=4096)
    add_special_tokens: bool = Field(True, strict=True)


class DetokenizeRequest(_Req):
    model: str | None = Field(None, max_length=512)
    tokens: list[StrictInt] = Field(max_length=MAX_TOKENS_LIMIT)

    @field_validator("tokens")
    @classmethod
    def _ids(cls, v: list[int]) -> list[int]:
        if any(isinstance(t, bool) or not 0 <= t <= TOKEN_ID_MAX for t in v):
            raise ValueError(f"token ids must be integers in 0..{TOKEN_ID_MAX}")
        return v


class EmbeddingRequest(_Req):
    model: str | None = Field(None, max_length=512)
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, strict=True, ge=1, le=65536)
    user: str | None = Field(None, max_length=512)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location without its union type tags ('prompt.list[int].0' → 'prompt.0')."""
    parts = [str(x) for x in loc if not (isinstance(x, str) and ("[" in x or x.lower() in _TYPE_TAGS))]
    return ".".join(parts) or None


def check_json(body: Any) -> None:
    """Refuse what JSON allows but no request needs: deep nesting, and strings that are not valid Unicode
    (a lone surrogate such as "\\ud800" cannot be encoded, and would fail deep in the tokenizer)."""
    stack: list[tuple[Any, int, str]] = [(body, 0, "")]
    while stack:
        value, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the request nests deeper than {MAX_JSON_DEPTH} levels", param=path or None,
                           code="invalid_request")
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise APIError(400, f"`{path or 'body'}` is not valid Unicode (a lone surrogate?)",
                                   param=path or None, code="invalid_request") from None
        elif isinstance(value, dict):
            for k, v in value.items():
                sub = f"{path}.{k}" if path else str(k)
                stack.append((k, depth + 1, path))
                stack.append((v, depth + 1, sub))
        elif isinstance(value, list):
            stack.extend((v, depth + 1, f"{path}.{i}") for i, v in enumerate(value))


def parse_request(model: type[BaseModel], body: Any) -> Any:
    """Validate a request body; the first problem becomes a 400 naming the parameter."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_request")
    check_json(body)
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        kind = "missing required parameter" if err["type"] == "missing" else "invalid value for"
        raise APIError(400, f"{kind} `{param}`: {msg}", param=param, code="invalid_request") from None
    bad = req.unsupported() if hasattr(req, "unsupported") else []
    if bad:
        raise APIError(400, f"`{bad[0]}` is not supported by this server", param=bad[0].split("=")[0].split(".")[0],
                       code="unsupported_parameter")
    return req
