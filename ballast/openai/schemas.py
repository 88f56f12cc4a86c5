"""Request schemas of the OpenAI API that Ballast serves, validated with pydantic.

Responses are built as plain dicts on the hot path (they are simple and fixed); requests are
validated here so every replica and the gateway reject the same bad input with the same message.
Parameters Ballast does not support are refused with a clear 400, never silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ballast.openai.errors import APIError


class _Req(BaseModel):
    # Unknown fields are kept (SDKs add new ones); `unsupported()` names those we refuse. Strict: JSON types are
    # taken as documented (`false` is not the integer 0, `"1"` is not 1).
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

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
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class _Sampling(_Req):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    # Extensions shared with vLLM.
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        out = []
        extra = self.model_extra or {}
        for key in ("tools", "functions", "logit_bias", "audio", "prediction"):
            if extra.get(key):
                out.append(key)
        if extra.get("tool_choice") not in (None, "none"):
            out.append("tool_choice")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            out.append(f"response_format.type={self.response_format.get('type')}")
        return out

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> list[str]:
        out = []
        if self.suffix:
            out.append("suffix")
        if self.best_of not in (None, self.n):
            out.append("best_of")
        if self.echo:
            out.append("echo")
        if (self.model_extra or {}).get("logit_bias"):
            out.append("logit_bias")
        return out

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "`prompt` must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def max_new_tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else 16


def parse_request(model: type[BaseModel], body: Any) -> Any:
    """Validate a request body; the first problem becomes a 400 naming the parameter."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_request")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        kind = "missing required parameter" if err["type"] == "missing" else "invalid value for"
        raise APIError(400, f"{kind} `{param}`: {msg}", param=param, code="invalid_request") from None
    bad = req.unsupported() if hasattr(req, "unsupported") else []
    if bad:
        raise APIError(400, f"`{bad[0]}` is not supported by this server", param=bad[0].split("=")[0].split(".")[0],
                       code="unsupported_parameter")
    return req
