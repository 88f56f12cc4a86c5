"""What a captured request becomes in a dataset: the conversation sent and the assistant message returned, in
OpenAI's chat fine-tuning format, for chat completions, completions and the Responses API, whole or streamed.

A stream is read as it passes through the gateway (a copy of each chunk, the client's bytes untouched) and gives
an answer only if it ended properly: an interrupted stream, or one that ended in an error event, is not a pair.
"""

from __future__ import annotations

import json
from typing import Any

from ballast.openai.responses import ResponsesRequest, to_chat

KINDS = ("chat_completions", "completions", "responses")


def conversation(kind: str, parsed: dict[str, Any]) -> list[Any] | None:
    """The messages a request sent, or None when it is not one conversation (token ids, several prompts)."""
    if kind == "chat_completions":
        msgs = parsed.get("messages")
        return list(msgs) if isinstance(msgs, list) else None
    if kind == "completions":
        prompt = parsed.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else None
    if kind == "responses":
        try:
            return list(to_chat(ResponsesRequest.model_validate(parsed))["messages"])
        except Exception:  # the replica took it, so this is not expected; capture nothing rather than guess
            return None
    return None


def _message(content: str | None, calls: list[dict[str, Any]]) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": (content or None) if calls else (content or "")}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _from_response(resp: dict[str, Any]) -> dict[str, Any] | None:
    """A Responses API `response` object as an assistant message (text parts joined, function calls)."""
    output = resp.get("output")
    if not isinstance(output, list):
        return None
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in output:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            texts += [str(p.get("text", "")) for p in item.get("content") or [] if isinstance(p, dict)
                      and p.get("type") == "output_text"]
        elif item.get("type") == "function_call":
            calls.append({"id": item.get("call_id"), "type": "function",
                          "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""}})
    return _message("".join(texts), calls)


def answer(kind: str, body: bytes) -> dict[str, Any] | None:
    """The assistant message of a whole (non-streamed) answer: its first choice, or the response's output."""
    try:
        obj = json.loads(body)
        if kind == "chat_completions":
            msg = obj["choices"][0]["message"]
            return msg if isinstance(msg, dict) else None
        if kind == "completions":
            return _message(str(obj["choices"][0]["text"]), [])
        if kind == "responses":
            return _from_response(obj)
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return None


class StreamAnswer:
    """Assembles the assistant message of a streamed answer from its SSE events, as they pass through."""

    def __init__(self, kind: str):
        self.kind = kind
        self.tail = b""  # bytes after the last complete event
        self.text: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.final: dict[str, Any] | None = None  # the Responses API's closing `response`
        self.ended = False  # [DONE], a finish_reason, or the closing response event was seen
        self.failed = False  # an error event, or a chunk that does not parse

    def feed(self, chunk: bytes) -> None:
        self.tail += chunk
        cut = self.tail.rfind(b"\n\n")
        if cut < 0:
            return
        events, self.tail = self.tail[:cut], self.tail[cut + 2:]
        for event in events.split(b"\n\n"):
            self._event(event)

    def result(self) -> dict[str, Any] | None:
        """The assistant message, or None when the stream did not end properly."""
        if self.tail.strip():
            self._event(self.tail)
            self.tail = b""
        if self.failed or not self.ended:
            return None
        if self.kind == "responses":
            return _from_response(self.final) if self.final is not None else None
        return _message("".join(self.text), [self.calls[i] for i in sorted(self.calls)])

    def _event(self, event: bytes) -> None:
        lines = event.strip().split(b"\n")
        if any(ln.startswith(b"event: error") for ln in lines):
            self.failed = True
            return
        data = b"".join(ln[6:] for ln in lines if ln.startswith(b"data: "))
        if not data:
            return
        if data.strip() == b"[DONE]":
            self.ended = True
            return
        try:
            obj = json.loads(data)
        except ValueError:
            self.failed = True
            return
        if isinstance(obj, dict):
            self._object(obj)

    def _object(self, obj: dict[str, Any]) -> None:
        if "error" in obj and "choices" not in obj:
            self.failed = True
        elif self.kind == "responses":
            if obj.get("type") in ("response.completed", "response.incomplete") and isinstance(obj.get("response"),
                                                                                                  dict):
                self.final, self.ended = obj["response"], True
            elif obj.get("type") in ("response.failed", "error"):
                self.failed = True
        else:
            for choice in obj.get("choices") or []:
                if isinstance(choice, dict) and choice.get("index", 0) == 0:
                    self._choice(choice)

    def _choice(self, choice: dict[str, Any]) -> None:
        if choice.get("finish_reason"):
            self.ended = True
        if self.kind == "completions":
            self.text.append(str(choice.get("text") or ""))
            return
        delta = choice.get("delta") or {}
        self.text.append(str(delta.get("content") or ""))
        for d in delta.get("tool_calls") or []:
            call = self.calls.setdefault(int(d.get("index", 0)), {"id": None, "type": "function",
                                                                  "function": {"name": "", "arguments": ""}})
            call["id"] = d.get("id") or call["id"]
            fn = d.get("function") or {}
            call["function"]["name"] += fn.get("name") or ""
            call["function"]["arguments"] += fn.get("arguments") or ""
