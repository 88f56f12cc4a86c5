"""`POST /v1/responses` on an LLM replica: the Responses API over the chat completions path.

The request is translated to a chat request (`ballast.openai.responses`) and run by the same code, so
structured outputs, tools, limits and metrics behave the same; the chat answer is reshaped into a
response object, or its chunks into typed events (`response.created`, `response.output_text.delta`,
`response.function_call_arguments.delta`, ..., `response.completed`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from ballast.openai import sse_event
from ballast.openai.responses import ResponsesRequest, to_chat
from ballast.openai.schemas import parse_request

ChatCall = Callable[[dict[str, Any]], Awaitable[Any]]


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _usage(u: dict[str, Any] | None) -> dict[str, Any] | None:
    if not u:
        return None
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["total_tokens"]}


def _message(text: str, status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
    return {"type": "message", "id": item_id or _id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _function_call(call_id: str, name: str, arguments: str, item_id: str | None = None,
                   status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id or _id("fc"), "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


class Shape:
    """The response object around the output: the request's settings echoed, status and usage."""

    def __init__(self, req: ResponsesRequest, model: str):
        self.req = req
        self.id = _id("resp")
        self.created = int(time.time())
        self.model = model

    def response(self, output: list[dict[str, Any]], status: str, usage: dict[str, Any] | None,
                 finish: str | None = None) -> dict[str, Any]:
        r = self.req
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "instructions": r.instructions, "max_output_tokens": r.max_output_tokens,
            "temperature": r.temperature, "top_p": r.top_p, "parallel_tool_calls": r.parallel_tool_calls is not False,
            "tool_choice": r.tool_choice or "auto", "tools": r.tools or [],
            "text": r.text or {"format": {"type": "text"}},
            "store": False, "previous_response_id": None, "metadata": r.metadata or {}, "user": r.user,
            "usage": _usage(usage),
        }


def _status(finish: str | None) -> str:
    return "incomplete" if finish == "length" else "completed"


async def create(body: Any, chat: ChatCall, model: str) -> Any:
    """Run a Responses request with `chat` (the host's chat completions call)."""
    req = parse_request(ResponsesRequest, body)
    shape = Shape(req, model)
    result = await chat(to_chat(req))
    if req.stream:
        return _events(shape, result)
    choice = result["choices"][0]
    msg = choice["message"]
    output: list[dict[str, Any]] = []
    if msg.get("content"):
        output.append(_message(msg["content"]))
    for call in msg.get("tool_calls") or []:
        fn = call["function"]
        output.append(_function_call(call["id"], fn["name"], fn["arguments"]))
    finish = choice["finish_reason"]
    return shape.response(output, _status(finish), result.get("usage"), finish)


async def _events(shape: Shape, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Chat chunks → typed Responses events, each framed as SSE with its `event:` name."""
    st = _EventState(shape)
    yield st.ev("response.created", response=shape.response([], "in_progress", None))
    yield st.ev("response.in_progress", response=shape.response([], "in_progress", None))
    try:
        async for chunk in chunks:
            for b in st.chunk(chunk):
                yield b
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    for b in st.end():
        yield b


class _EventState:
    """One streamed response: the next sequence number, the output indexes handed out, the text item and
    the calls still open; items are completed in the order events promise them."""

    def __init__(self, shape: Shape):
        self.shape = shape
        self.seq = 0
        self.output: list[tuple[int, dict[str, Any]]] = []  # (output_index, item) as items complete
        self.items = 0  # output indexes handed out
        self.text_item: dict[str, Any] | None = None
        self.text_index = 0
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None
        self.usage: Any = None

    def ev(self, kind: str, **data: Any) -> bytes:
        self.seq += 1
        return sse_event({"type": kind, "sequence_number": self.seq - 1, **data}, event=kind)

    def chunk(self, chunk: dict[str, Any]) -> Iterator[bytes]:
        """The events for one chat chunk: text deltas, then tool call deltas, per choice."""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for part in chunk["choices"]:
            delta = part.get("delta") or {}
            self.finish = part.get("finish_reason") or self.finish
            text = delta.get("content")
            if text:
                yield from self._text(text)
            for d in delta.get("tool_calls") or []:
                yield from self._call(d)

    def _text(self, text: str) -> Iterator[bytes]:
        if self.text_item is None:
            self.text_item, self.text_index, self.items = _message("", "in_progress"), self.items, self.items + 1
            yield self.ev("response.output_item.added", output_index=self.text_index, item=self.text_item)
            yield self.ev("response.content_part.added", item_id=self.text_item["id"], output_index=self.text_index,
                          content_index=0, part={"type": "output_text", "text": "", "annotations": []})
        self.text_item["content"][0]["text"] += text
        yield self.ev("response.output_text.delta", item_id=self.text_item["id"], output_index=self.text_index,
                      content_index=0, delta=text, logprobs=[])

    def _call(self, d: dict[str, Any]) -> Iterator[bytes]:
        fn = d.get("function") or {}
        if d.get("id"):  # a new call: the text before it is complete
            yield from self.close_text()
            item = _function_call(d["id"], fn.get("name", ""), "", status="in_progress")
            self.calls[d["index"]] = {"item": item, "output_index": self.items}
            self.items += 1
            yield self.ev("response.output_item.added", output_index=self.calls[d["index"]]["output_index"],
                          item=item)
        st = self.calls[d["index"]]
        if fn.get("arguments"):
            st["item"]["arguments"] += fn["arguments"]
            yield self.ev("response.function_call_arguments.delta", item_id=st["item"]["id"],
                          output_index=st["output_index"], delta=fn["arguments"])

    def close_text(self) -> list[bytes]:
        """The done events of the text item, if one is open."""
        if self.text_item is None:
            return []
        i, item = self.text_index, {**self.text_item, "status": "completed"}
        self.text_item = None
        text = item["content"][0]["text"]
        self.output.append((i, item))
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return [self.ev("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                        text=text, logprobs=[]),
                self.ev("response.content_part.done", item_id=item["id"], output_index=i, content_index=0,
                        part=part),
                self.ev("response.output_item.done", output_index=i, item=item)]

    def end(self) -> Iterator[bytes]:
        """The stream ended: complete the open items, then the response with every item in output order."""
        yield from self.close_text()
        for st in self.calls.values():
            item = {**st["item"], "status": "completed"}
            self.output.append((st["output_index"], item))
            yield self.ev("response.function_call_arguments.done", item_id=item["id"],
                          output_index=st["output_index"], name=item["name"], arguments=item["arguments"])
            yield self.ev("response.output_item.done", output_index=st["output_index"], item=item)
        status = _status(self.finish)
        done = [item for _, item in sorted(self.output, key=lambda x: x[0])]
        yield self.ev(f"response.{status}", response=self.shape.response(done, status, self.usage, self.finish))
