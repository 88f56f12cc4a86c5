"""The pure parts of mid-stream resume: which requests may move, what the gateway learns from a stream's token
reports, and the continuation it sends (the end-to-end behaviour is in test_midstream_resume.py)."""

from __future__ import annotations

import json

from ballast.gateway.proxy import Outcome
from ballast.gateway.resume import STREAM_TOKENS_HEADER, StreamLog, resume_plan


def _event(obj: dict, ids: list[int] | None, p: int = 7) -> bytes:
    head = b"" if ids is None else b": ballast " + json.dumps({"ids": ids, "p": p}).encode() + b"\n"
    return head + b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"  # as replicas send it


def _chunk(content: str | None = None, finish: str | None = None, role: bool = False) -> dict:
    delta = {"role": "assistant", "content": ""} if role else ({"content": content} if content else {})
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_only_faithful_llm_streams_get_a_plan():
    chat = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    headers: dict[str, str] = {}
    assert resume_plan("chat_completions", chat, True, 3, headers) is not None
    assert headers[STREAM_TOKENS_HEADER] == "1"
    for extra in ({"n": 2}, {"logprobs": True}, {"tools": [{"type": "function"}]}, {"stop": ["x"]},
                  {"response_format": {"type": "json_object"}}, {"stream": False}):
        headers = {}
        assert resume_plan("chat_completions", {**chat, **extra}, True, 3, headers) is None, extra
        assert headers == {}
    assert resume_plan("chat_completions", chat, False, 3, {}) is None  # not an LLM
    assert resume_plan("chat_completions", chat, True, 0, {}) is None  # migration_limit 0
    assert resume_plan("completions", {"stream": True, "prompt": ["a", "b"]}, True, 3, {}) is None
    assert resume_plan("completions", {"stream": True, "prompt": "a", "logprobs": 0}, True, 3, {}) is None


def test_reports_are_stripped_and_the_continuation_carries_exactly_what_was_sent():
    chat = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    plan = resume_plan("chat_completions", chat, True, 3, {})
    assert plan is not None
    log = StreamLog(plan, Outcome(), strip_usage=True)
    stream = _event(_chunk(role=True), []) + _event(_chunk("Hel"), [1, 2]) + _event(_chunk("lo"), [3])
    out = log.feed(stream[:-5]) + log.feed(stream[-5:] + b": ballast {")  # events split anywhere
    assert b"ballast" not in out and out.count(b"data: ") == 3
    log.settle()
    assert (log.text, log.ids, log.role_sent, log.finished, log.prompt_tokens) == ("Hello", [1, 2, 3], True, False, 7)
    body = json.loads(log.continuation() or b"")
    assert body["messages"][-1] == {"role": "assistant", "content": "Hello"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["ballast_resume"] == {"token_ids": [1, 2, 3]} and body["max_tokens"] == 7
    assert chat["max_tokens"] == 10 and len(chat["messages"]) == 1  # the original body is untouched

    # A resumed replica's chunks keep the first stream's identity, and its role chunk is not repeated.
    log.resumed = True
    again = {**_chunk(role=True), "id": "chatcmpl-2", "created": 9}
    assert log.feed(_event(again, [])) == b""
    out = log.feed(_event({**_chunk(" world", "length"), "id": "chatcmpl-2", "created": 9}, [4]))
    assert json.loads(out[6:])["id"] == "chatcmpl-1" and json.loads(out[6:])["created"] == 5
    assert log.text == "Hello world" and log.finished

    # The resumed replica's usage (the whole answer) is metered; the client did not ask for it, so it is not sent.
    usage = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
    assert log.feed(_event({"id": "chatcmpl-2", "choices": [], "usage": usage}, [])) == b""
    assert log.outcome.usage == usage and log.feed(b"data: [DONE]\n\n") == b"data: [DONE]\n\n" and log.done

    # Out of budget: nothing to continue with.
    log.ids = list(range(10))
    assert log.continuation() is None


def test_a_finished_answer_cut_before_done_gets_its_usage_and_done():
    plan = resume_plan("completions", {"stream": True, "prompt": "a", "max_tokens": 4,
                                       "stream_options": {"include_usage": True}}, True, 3, {})
    assert plan is not None
    outcome = Outcome()
    log = StreamLog(plan, outcome, strip_usage=False)
    text = {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m"}
    log.feed(_event({**text, "choices": [{"index": 0, "text": "ab", "finish_reason": None}]}, [1, 2], p=3)
             + _event({**text, "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}, [3], p=3))
    log.settle()
    assert log.finished
    closing = log.closing()
    assert closing.endswith(b"data: [DONE]\n\n")
    usage = json.loads(closing.split(b"\n\n")[0][6:])["usage"]
    assert usage == outcome.usage == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}

    # A chunk without a report: the count is not exact, so the stream may not move.
    log = StreamLog(plan, Outcome(), strip_usage=False)
    log.feed(_event({**text, "choices": [{"index": 0, "text": "ab", "finish_reason": None}]}, None))
    log.settle()
    assert log.why_not() is not None
