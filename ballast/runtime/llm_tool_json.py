"""Tool-call formats whose calls are bare JSON: Llama-3 JSON (`{"name": ..., "parameters": {...}}`, calls joined by
`;`) and Mistral (`[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`; the marker is a special token that a
detokenizer may drop, so a bare JSON array of calls reads the same). Both parsers give whole calls when the output
ends; `llm_tools` holds Hermes, the prompts, the forced-call grammars and the streaming.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

MISTRAL_MARK = "[TOOL_CALLS]"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text

    def openai(self, index: int | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                             "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            d["index"] = index
        return d


def _as_call(text: str, args_key: str) -> ToolCall | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def mistral_id(call_id: Any) -> str:
    """A call id as Mistral's chat templates require (9 letters or digits), the same for the call and its result."""
    alnum = "".join(ch for ch in str(call_id or "") if ch.isascii() and ch.isalnum())
    return alnum[-9:].rjust(9, "0")


class Llama3JsonParser:
    """The whole output is one call (or several joined by `;`) when it starts with `{`; else it is text."""

    def __init__(self) -> None:
        self.buf = ""
        self.mode: str | None = None  # None (deciding), "json" or "text"
        self.ncalls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if self.mode == "text":
            return text, []
        self.buf += text
        head = self.buf.lstrip()
        if not head:
            return "", []
        self.mode = "json" if head.startswith("{") else "text"
        if self.mode == "text":
            out, self.buf = self.buf, ""
            return out, []
        return "", []

    def finish(self) -> tuple[str, list[ToolCall]]:
        buf, self.buf = self.buf, ""
        if self.mode != "json":
            return buf, []
        parts = [p for p in buf.strip().split(";") if p.strip()]
        calls = [_as_call(p.strip(), "parameters") for p in parts]
        if not calls or any(c is None for c in calls):
            whole = _as_call(buf.strip(), "parameters")
            if whole is None:
                return buf, []
            calls = [whole]
        self.ncalls = len(calls)
        return "", [c for c in calls if c is not None]


class MistralParser:
    """Calls when the output starts with `[TOOL_CALLS]` (or a JSON array of calls); else it is text."""

    def __init__(self) -> None:
        self.buf = ""
        self.mode: str | None = None  # None (deciding), "calls" or "text"
        self.ncalls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if self.mode == "text":
            return text, []
        self.buf += text
        head = self.buf.lstrip()
        if not head or (MISTRAL_MARK.startswith(head) and head != MISTRAL_MARK):
            return "", []  # may still become the marker
        self.mode = "calls" if head.startswith((MISTRAL_MARK, "[{", "[ {", "[\n")) else "text"
        if self.mode == "text":
            out, self.buf = self.buf, ""
            return out, []
        return "", []

    def finish(self) -> tuple[str, list[ToolCall]]:
        buf, self.buf = self.buf, ""
        if self.mode != "calls":
            return buf, []
        body = buf.strip()
        body = body[len(MISTRAL_MARK):] if body.startswith(MISTRAL_MARK) else body
        try:
            items = json.loads(body)
        except ValueError:
            return buf, []
        items = items if isinstance(items, list) else [items]
        calls = [_as_call(json.dumps(x), "arguments") for x in items]
        if not calls or any(c is None for c in calls):
            return buf, []
        self.ncalls = len(calls)
        return "", [c for c in calls if c is not None]
