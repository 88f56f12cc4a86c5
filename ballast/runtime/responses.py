"""`POST /v1/responses` on an LLM replica: the Responses API over the chat completions path.

The request is translated to a chat request (`ballast.openai.responses`) and run by the same code, so
structured outputs, tools, limits and metrics behave the same; the chat answer is reshaped into a
response object, or its chunks into typed events (`response.created`, `response.output_text.delta`,
`response.function_call_arguments.delta`, ..., `response.completed`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
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
    seq = 0

    def ev(kind: str, **data: Any) -> bytes:
        nonlocal seq
        seq += 1
        return sse_event({"type": kind, "sequence_number": seq - 1, **data}, event=kind)

    output: list[tuple[int, dict[str, Any]]] = []  # (output_index, item) as items complete
    items = 0  # output indexes handed out
    text_item: dict[str, Any] | None = None
    text_index = 0
    calls: dict[int, dict[str, Any]] = {}
    finish: str | None = None
    usage = None
    yield ev("response.created", response=shape.response([], "in_progress", None))
    yield ev("response.in_progress", response=shape.response([], "in_progress", None))

    def close_text() -> list[bytes]:
        nonlocal text_item
        if text_item is None:
            return []
        i, item = text_index, {**text_item, "status": "completed"}
        text_item = None
        text = item["content"][0]["text"]
        output.append((i, item))
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return [ev("response.output_text.done", item_id=item["id"], output_index=i, content_index=0, text=text,
                   logprobs=[]),
                ev("response.content_part.done", item_id=item["id"], output_index=i, content_index=0, part=part),
                ev("response.output_item.done", output_index=i, item=item)]

    try:
        async for chunk in chunks:
            if chunk.get("usage"):
                usage = chunk["usage"]
            for part in chunk["choices"]:
                delta = part.get("delta") or {}
                finish = part.get("finish_reason") or finish
                text = delta.get("content")
                if text:
                    if text_item is None:
                        text_item, text_index, items = _message("", "in_progress"), items, items + 1
                        yield ev("response.output_item.added", output_index=text_index, item=text_item)
                        yield ev("response.content_part.added", item_id=text_item["id"], output_index=text_index,
                                 content_index=0, part={"type": "output_text", "text": "", "annotations": []})
                    text_item["content"][0]["text"] += text
                    yield ev("response.output_text.delta", item_id=text_item["id"], output_index=text_index,
                             content_index=0, delta=text, logprobs=[])
                for d in delta.get("tool_calls") or []:
                    fn = d.get("function") or {}
                    if d.get("id"):  # a new call: the text before it is complete
                        for b in close_text():
                            yield b
                        item = _function_call(d["id"], fn.get("name", ""), "", status="in_progress")
                        calls[d["index"]] = {"item": item, "output_index": items}
                        items += 1
                        yield ev("response.output_item.added", output_index=calls[d["index"]]["output_index"],
                                 item=item)
                    st = calls[d["index"]]
                    if fn.get("arguments"):
                        st["item"]["arguments"] += fn["arguments"]
                        yield ev("response.function_call_arguments.delta", item_id=st["item"]["id"],
                                 output_index=st["output_index"], delta=fn["arguments"])
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    for b in close_text():
        yield b
    for st in calls.values():
        item = {**st["item"], "status": "completed"}
        output.append((st["output_index"], item))
        yield ev("response.function_call_arguments.done", item_id=item["id"], output_index=st["output_index"],
                 name=item["name"], arguments=item["arguments"])
        yield ev("response.output_item.done", output_index=st["output_index"], item=item)
    status = _status(finish)
    done = [item for _, item in sorted(output, key=lambda x: x[0])]
    yield ev(f"response.{status}", response=shape.response(done, status, usage, finish))
