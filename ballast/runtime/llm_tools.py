"""Tool calling on the native engine: prompt rendering, forced calls by grammar, and parsing calls out of
the model's text (whole, or streamed as OpenAI `tool_calls` deltas).

Three call formats: Hermes (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, SmolLM2/Qwen
style), Llama-3 JSON (`{"name": ..., "parameters": {...}}`) and Mistral (`[TOOL_CALLS] [{...}]`; those two in
`llm_tool_json`). Which one is read from the chat template's text unless `engine.tool_parser` says. A
template that does not know tools (SmolLM2's) gets the tools described in the system message, and past
calls and results written in the format.
Parsing is post-processing of the formatter's output, so plain completions pay nothing.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ballast.engine.guided import GuidedSpec
from ballast.openai.tools import ToolRequest, message_tool_calls
from ballast.runtime.llm_tool_json import (
    MISTRAL_MARK,
    Llama3JsonParser,
    MistralParser,
    ToolCall,
    _as_call,
    mistral_id,
)

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def choose_parser(template: str | None, configured: str = "auto") -> str:
    if configured != "auto":
        return configured
    t = template or ""
    if MISTRAL_MARK in t:
        return "mistral"
    if "<|python_tag|>" in t or ("ipython" in t and "parameters" in t):
        return "llama3_json"
    return "hermes"


# ---- prompt ----------------------------------------------------------------------------------
def _tools_prompt(tools: ToolRequest, parser: str) -> str:
    specs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools.openai_tools())
    if parser == "llama3_json":
        return ("You can call these functions:\n" + specs + "\nTo call one, answer with only a JSON object "
                '{"name": <function name>, "parameters": <arguments object>}.')
    if parser == "mistral":
        listed = specs.replace("\n", ", ")
        return (f"[AVAILABLE_TOOLS] [{listed}] [/AVAILABLE_TOOLS]\nTo call functions, answer with "
                f'{MISTRAL_MARK} [{{"name": <function name>, "arguments": <arguments object>}}, ...].')
    return ("You can call functions. Their signatures, as JSON schemas, are:\n<tools>\n" + specs + "\n</tools>\n"
            f"To call a function, answer with one {OPEN}{CLOSE} block per call, each holding a JSON object:\n"
            f'{OPEN}{{"name": <function name>, "arguments": <arguments object>}}{CLOSE}')


def _call_text(call: dict[str, Any], parser: str) -> str:
    fn = call["function"]
    if parser == "llama3_json":
        return json.dumps({"name": fn["name"], "parameters": fn["arguments"]}, ensure_ascii=False)
    if parser == "mistral":
        return MISTRAL_MARK + " " + json.dumps([{"name": fn["name"], "arguments": fn["arguments"]}], ensure_ascii=False)
    return OPEN + json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False) + CLOSE


def template_messages(messages: list[Any], tools: ToolRequest | None, template: str | None,
                      parser: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages and extra template variables. A template that knows tools gets them as HF templates
    expect (`tools=`, `tool_calls` with object arguments); any other gets them written as text."""
    knows = "tools" in (template or "")
    msgs = [_template_message(i, m, knows, parser) for i, m in enumerate(messages)]
    if tools is None or not tools.active:
        return msgs, {}
    if knows:
        return msgs, {"tools": tools.openai_tools()}
    _add_tools_prompt(msgs, _tools_prompt(tools, parser))
    return msgs, {}


def _template_message(i: int, m: Any, knows: bool, parser: str) -> dict[str, Any]:
    """Message `i` for the template: tool calls as `tool_calls` if the template knows tools, else as text."""
    extra = m.model_extra or {}
    msg: dict[str, Any] = {"role": m.role, "content": m.text()}
    calls = message_tool_calls(extra, i) if m.role == "assistant" else []
    if m.role == "tool" and extra.get("tool_call_id"):
        msg["tool_call_id"] = extra["tool_call_id"]
    if m.name:
        msg["name"] = m.name
    if knows and parser == "mistral":  # Mistral's templates refuse ids that are not 9 letters or digits
        calls = [{**c, "id": mistral_id(c.get("id"))} for c in calls]
        if "tool_call_id" in msg:
            msg["tool_call_id"] = mistral_id(msg["tool_call_id"])
    if knows:
        if calls:
            msg["tool_calls"] = calls
    elif calls:
        msg["content"] = "\n".join(filter(None, [msg["content"]] + [_call_text(c, parser) for c in calls]))
    elif m.role == "tool" and parser == "hermes":
        msg["content"] = f"<tool_response>\n{msg['content']}\n</tool_response>"
    return msg


def _add_tools_prompt(msgs: list[dict[str, Any]], prompt: str) -> None:
    """Append the tools text to the system (or developer) message, or add a system message for it."""
    if msgs and msgs[0]["role"] in ("system", "developer"):
        msgs[0] = {**msgs[0], "content": (msgs[0]["content"] + "\n\n" + prompt).strip()}
    else:
        msgs.insert(0, {"role": "system", "content": prompt})


# ---- forced calls ------------------------------------------------------------------------------
def _call_schema(fn: Any, parser: str) -> dict[str, Any]:
    params = copy.deepcopy(fn.params_schema())
    if params.get("type") == "object" and "additionalProperties" not in params:
        params["additionalProperties"] = False  # the arguments are the declared ones, as strict mode has it
    key = "parameters" if parser == "llama3_json" else "arguments"
    return {"type": "object", "properties": {"name": {"const": fn.name}, key: params},
            "required": ["name", key], "additionalProperties": False}


def forced_spec(tools: ToolRequest, parser: str) -> GuidedSpec | None:
    """`required` or a named `tool_choice`: a grammar that only admits calls with schema-valid arguments."""
    if not tools.forced:
        return None
    fns = [f for f in tools.functions if tools.choice == "required" or f.name == tools.named]
    schemas = [_call_schema(f, parser) for f in fns]
    call: dict[str, Any] = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    call["x-guidance"] = {"whitespace_flexible": False}
    body = "%json " + json.dumps(call)
    if parser == "llama3_json":
        return GuidedSpec("lark", f"start: call\ncall: {body}", "tools")
    if parser == "mistral":
        item = {k: v for k, v in call.items() if k != "x-guidance"}
        calls = {"type": "array", "items": item, "minItems": 1, "x-guidance": call["x-guidance"]}
        if not (tools.parallel and tools.choice == "required"):
            calls["maxItems"] = 1
        return GuidedSpec("lark", f'start: "{MISTRAL_MARK} " calls\ncalls: %json {json.dumps(calls)}', "tools")
    many = tools.parallel and tools.choice == "required"
    return GuidedSpec("lark", f'start: tc{"+" if many else ""}\ntc: "{OPEN}" call "{CLOSE}"\ncall: {body}', "tools")


# ---- parsing -----------------------------------------------------------------------------------
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def _hermes_call(text: str) -> ToolCall | None:
    """A call whose JSON starts with name then arguments keeps its arguments' text as written, so the
    arguments streamed while the call was forming are a prefix of them; any other order is normalized."""
    m = _HEAD.match(text)
    if m:
        try:
            args, end = json.JSONDecoder().raw_decode(text, m.end())
            name = json.loads(f'"{m.group(1)}"')
        except ValueError:
            args = None
        if isinstance(args, dict) and text[end:].strip() == "}":
            return ToolCall(name, text[m.end():end])
    return _as_call(text.strip(), "arguments")


class HermesParser:
    """Incremental: text in, (content, completed calls) out; holds back what may be a tag forming.
    `progress()` tells the name and the arguments so far of a call still forming."""

    def __init__(self) -> None:
        self.buf = ""
        self.in_call = False
        self.pending_ws = ""
        self.ncalls = 0

    def _content(self, text: str) -> str:
        """Trailing whitespace waits: it is dropped when a call follows, so every chunking gives one text."""
        s = self.pending_ws + text
        body = s.rstrip()
        self.pending_ws = s[len(body):]
        return body

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buf += text
        content, calls = "", list[ToolCall]()
        while True:
            if not self.in_call:
                i = self.buf.find(OPEN)
                if i >= 0:
                    content += self._content(self.buf[:i])
                    self.buf, self.in_call = self.buf[i + len(OPEN):], True
                    continue
                hold = next((k for k in range(min(len(OPEN) - 1, len(self.buf)), 0, -1)
                             if self.buf.endswith(OPEN[:k])), 0)
                content += self._content(self.buf[: len(self.buf) - hold])
                self.buf = self.buf[len(self.buf) - hold:]
                return content, calls
            j = self.buf.find(CLOSE)
            if j < 0:
                return content, calls
            call = _hermes_call(self.buf[:j])
            if call is None:
                content += self._content(OPEN + self.buf[: j + len(CLOSE)])
            else:
                calls.append(call)
                self.ncalls += 1
            self.buf, self.in_call = self.buf[j + len(CLOSE):], False

    def progress(self) -> tuple[str, str] | None:
        """(name, arguments so far) of the call forming, once its name is known; holds back the end that
        may be the call's closing brace or tag, so what it gives is a prefix of the final arguments."""
        m = _HEAD.match(self.buf) if self.in_call else None
        if m is None:
            return None
        try:
            name = json.loads(f'"{m.group(1)}"')
        except ValueError:
            return None
        args = self.buf[m.end():]
        hold = next((k for k in range(min(len(CLOSE) - 1, len(args)), 0, -1) if args.endswith(CLOSE[:k])), 0)
        return name, args[: len(args) - hold].rstrip("} \t\r\n")

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the output: an unterminated last call still counts if its JSON is whole."""
        buf, self.buf = self.buf, ""
        if self.in_call:
            call = _hermes_call(buf)
            if call is not None:
                self.ncalls += 1
                return "", [call]
            buf = OPEN + buf
        out = self._content(buf)
        if not self.ncalls:
            out, self.pending_ws = out + self.pending_ws, ""
        return out, []


def new_parser(parser: str) -> HermesParser | Llama3JsonParser | MistralParser:
    if parser == "llama3_json":
        return Llama3JsonParser()
    return MistralParser() if parser == "mistral" else HermesParser()


def parse_text(text: str, parser: str) -> tuple[str | None, list[ToolCall]]:
    """A whole output → (content or None, calls), with the same code the stream uses."""
    p = new_parser(parser)
    content, calls = p.feed(text)
    rest, more = p.finish()
    content += rest
    return (content if content or not (calls + more) else None), calls + more


def apply_to_response(resp: dict[str, Any], parser: str) -> dict[str, Any]:
    """A chat completion with its calls moved from the text into `tool_calls`."""
    for choice in resp["choices"]:
        msg = choice["message"]
        content, calls = parse_text(msg.get("content") or "", parser)
        if calls:
            msg["content"] = content
            msg["tool_calls"] = [c.openai() for c in calls]
            if choice["finish_reason"] == "stop":
                choice["finish_reason"] = "tool_calls"
    return resp


async def apply_to_stream(chunks: AsyncIterator[dict[str, Any]], parser: str) -> AsyncIterator[dict[str, Any]]:
    """Streamed chunks with calls sent as `tool_calls` deltas: id and name once the name is known, then
    the arguments as they form (Hermes), or each whole call as it closes (Llama-3 JSON)."""
    calls = _StreamCalls(parser)
    first = True
    async for chunk in chunks:
        if first or not chunk["choices"]:  # the role chunk and the usage chunk pass through
            first = False
            yield chunk
            continue
        for part in chunk["choices"]:
            for out in calls.part(chunk, part):
                yield out


def _one(env: dict[str, Any], i: int, delta: dict[str, Any], fin: str | None = None,
         lp: Any = None) -> dict[str, Any]:
    """A chunk like `env` carrying one delta for choice `i`."""
    return {**env, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": fin}]}


def _args(env: dict[str, Any], i: int, k: int, text: str) -> dict[str, Any]:
    """More arguments text of call `k` of choice `i`."""
    return _one(env, i, {"tool_calls": [{"index": k, "function": {"arguments": text}}]})


class _StreamCalls:
    """Per-choice parsing state of one streamed response: the parser, how many calls were sent, and the
    call still forming (its name and the arguments sent so far), so each byte goes out exactly once."""

    def __init__(self, parser: str):
        self.parser = parser
        self.states: dict[int, Any] = {}
        self.counts: dict[int, int] = {}
        self.live: dict[int, list[Any]] = {}  # choice index → [call index, arguments sent] of the call forming

    def _next_call(self, idx: int) -> int:
        k = self.counts.get(idx, 0)
        self.counts[idx] = k + 1
        return k

    def part(self, chunk: dict[str, Any], part: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The chunks to send for one choice of an upstream chunk."""
        idx = part["index"]
        st = self.states.setdefault(idx, new_parser(self.parser))
        content, calls = st.feed((part.get("delta") or {}).get("content") or "")
        finish = part.get("finish_reason")
        if finish:
            rest, more = st.finish()
            content, calls = content + rest, calls + more
        if content:
            yield _one(chunk, idx, {"content": content}, lp=part.get("logprobs"))
        for call in calls:
            yield from self._closed(chunk, idx, call)
        if idx in self.live and not getattr(st, "in_call", False):  # it closed unparseable: it was text
            self.live.pop(idx)
        if isinstance(st, HermesParser) and not finish:
            yield from self._forming(chunk, idx, st.progress())
        if finish:
            yield _one(chunk, idx, {}, "tool_calls" if self.counts.get(idx) and finish == "stop" else finish)

    def _closed(self, chunk: dict[str, Any], idx: int, call: ToolCall) -> Iterator[dict[str, Any]]:
        """A call that closed: the rest of its arguments if it was forming, else its head and arguments."""
        forming = self.live.pop(idx, None)
        if forming is not None:  # its name and the start of its arguments are out already
            k, sent = forming
            if call.arguments.startswith(sent) and call.arguments != sent:
                yield _args(chunk, idx, k, call.arguments[len(sent):])
            return
        k = self._next_call(idx)
        head = call.openai(k)
        head["function"]["arguments"] = ""
        yield _one(chunk, idx, {"tool_calls": [head]})
        yield _args(chunk, idx, k, call.arguments)

    def _forming(self, chunk: dict[str, Any], idx: int, now: tuple[str, str] | None) -> Iterator[dict[str, Any]]:
        """A Hermes call still open: its head once the name is known, then arguments as they grow."""
        if now is None:
            return
        name, so_far = now
        if idx not in self.live:
            k = self._next_call(idx)
            self.live[idx] = [k, ""]
            yield _one(chunk, idx, {"tool_calls": [ToolCall(name, "").openai(k)]})
        k, sent = self.live[idx]
        if len(so_far) > len(sent) and so_far.startswith(sent):
            yield _args(chunk, idx, k, so_far[len(sent):])
            self.live[idx][1] = so_far
