"""The Responses API request (`POST /v1/responses`), validated, and its translation to a chat request.

A response is a chat completion in another shape: input items become chat messages, `text.format`
becomes `response_format`, flat function tools become chat tools. Nothing is stored, so
`previous_response_id` and `store: true` are refused with a 400 that says so.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ballast.openai.errors import APIError
from ballast.openai.schemas import MAX_TOKENS_LIMIT

_CONFIG = ConfigDict(extra="allow", allow_inf_nan=False)
_REFUSED = ("background", "conversation", "prompt", "reasoning")


class ResponsesRequest(BaseModel):
    model_config = _CONFIG
    model: str | None = Field(None, max_length=512)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, strict=True, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, strict=True, ge=0, le=2)
    top_p: float | None = Field(None, strict=True, gt=0, le=1)
    stream: bool = Field(False, strict=True)
    store: bool | None = Field(None, strict=True)
    previous_response_id: str | None = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = Field(None, strict=True)
    metadata: dict[str, str] | None = None
    user: str | None = Field(None, max_length=512)

    def unsupported(self) -> list[str]:
        if self.previous_response_id:
            raise APIError(400, "`previous_response_id` is not supported: this server stores no responses "
                           "(store is false); send the whole conversation in `input`",
                           param="previous_response_id", code="unsupported_parameter")
        if self.store:
            raise APIError(400, "`store: true` is not supported: this server stores no responses",
                           param="store", code="unsupported_parameter")
        return [k for k in _REFUSED if (self.model_extra or {}).get(k)]


def _text_of(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"`{param}` must be a string or a list of text parts", param=param)
    parts = []
    for p in content:
        if not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text", "text"):
            raise APIError(400, f"`{param}`: only text parts are supported", param=param)
        parts.append(str(p.get("text", "")))
    return "".join(parts)


def _messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    if req.instructions:
        msgs.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return [*msgs, {"role": "user", "content": req.input}]
    for i, item in enumerate(req.input):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"`input.{i}.role` must be user, assistant, system or developer",
                               param=f"input.{i}.role")
            msgs.append({"role": role, "content": _text_of(item.get("content"), f"input.{i}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
            if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls") is not None:
                msgs[-1]["tool_calls"].append(call)  # parallel calls: one assistant message
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out = item.get("output")
            msgs.append({"role": "tool", "tool_call_id": item.get("call_id"),
                         "content": out if isinstance(out, str) else json.dumps(out)})
        else:
            raise APIError(400, f"input items of type {kind!r} are not supported", param=f"input.{i}.type")
    return msgs


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    return dict(fmt)


def to_chat(req: ResponsesRequest) -> dict[str, Any]:
    """The chat completions body that produces this response."""
    body: dict[str, Any] = {"model": req.model, "messages": _messages(req), "stream": req.stream}
    for key, value in (("max_tokens", req.max_output_tokens), ("temperature", req.temperature),
                       ("top_p", req.top_p), ("response_format", _response_format(req.text)),
                       ("parallel_tool_calls", req.parallel_tool_calls)):
        if value is not None:
            body[key] = value
    if req.tools:
        body["tools"] = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
                         if t.get("type") == "function" else t for t in req.tools]
    choice = req.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    if choice is not None:
        body["tool_choice"] = choice
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    return body
