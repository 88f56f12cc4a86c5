"""Tool calling on the native engine with the openai client (tiny random Llama), and the call parsers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from ballast.runtime.llm_tools import apply_to_stream, choose_parser, parse_text
from tests.conftest import write_package
from tests.runtime.test_llm_serving import client_for

pytest.importorskip("llguidance")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]},
                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}}
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import Replica

    pkg = write_package(tmp_path_factory.mktemp("tools") / "tiny", f"""
        name: tiny
        engine: {{kind: native, checkpoint: {tiny_checkpoint}, served_model_name: tiny-chat, max_model_len: 2048,
                  kv_cache_memory: 64Mi}}
        """)  # the tiny tokenizer spends many tokens on the tools' description
    rep = Replica(pkg)
    try:
        rep.wait_ready(180)
        yield rep
    finally:
        rep.stop()


def valid_call(call, tool) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def test_named_tool_choice_always_valid(llm):
    c = client_for(llm)
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(model="tiny-chat", messages=MSGS, tools=[TIME, WEATHER], tool_choice=named, n=4,
                                  temperature=1.0, max_tokens=120)
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls", ch.message
        assert len(ch.message.tool_calls) == 1 and not ch.message.content
        valid_call(ch.message.tool_calls[0], WEATHER)


def test_required_single_call(llm):
    c = client_for(llm)
    r = c.chat.completions.create(model="tiny-chat", messages=MSGS, tools=[TIME, WEATHER], tool_choice="required",
                                  parallel_tool_calls=False, n=3, temperature=1.0, max_tokens=120)
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
        call = ch.message.tool_calls[0]
        valid_call(call, WEATHER if call.function.name == "get_weather" else TIME)


def test_streamed_call_reassembles_to_the_whole_one(llm):
    c = client_for(llm)
    kw = dict(model="tiny-chat", messages=MSGS, tools=[WEATHER], tool_choice="required", temperature=0,
              max_tokens=120, parallel_tool_calls=False)
    whole = c.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in c.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                acc = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                acc["id"] = d.id or acc["id"]
                acc["name"] += (d.function.name or "") if d.function else ""
                acc["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["id"].startswith("call_")
    assert (calls[0]["name"], calls[0]["arguments"]) == (whole.function.name, whole.function.arguments)


def test_multi_turn_tool_conversation(llm):
    c = client_for(llm)
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = c.chat.completions.create(model="tiny-chat", messages=MSGS, tools=[WEATHER], tool_choice=named,
                                      max_tokens=120, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21, "sky": "clear"})}]
    answer = c.chat.completions.create(model="tiny-chat", messages=history, tools=[WEATHER], tool_choice="none",
                                       max_tokens=16, temperature=0)
    ch = answer.choices[0]
    assert ch.finish_reason in ("stop", "length") and isinstance(ch.message.content, str)
    assert not ch.message.tool_calls
    alone = c.chat.completions.create(model="tiny-chat", messages=MSGS, tools=[WEATHER], tool_choice="none",
                                      max_tokens=1)
    assert answer.usage.prompt_tokens > alone.usage.prompt_tokens
    # The call and its result are written into the prompt the model saw.
    ids = httpx.post(llm.url + "/tokenize", json={"messages": history}).json()["tokens"]
    prompt = httpx.post(llm.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert '<tool_call>{"name": "get_weather"' in prompt and '"temp_c": 21' in prompt and "<tool_response>" in prompt


def test_tool_errors_are_400s(llm):
    c = client_for(llm)
    with pytest.raises(openai.BadRequestError, match="not in `tools`"):
        c.chat.completions.create(model="tiny-chat", messages=MSGS, tools=[WEATHER], max_tokens=4,
                                  tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="no `tools`"):
        c.chat.completions.create(model="tiny-chat", messages=MSGS, tool_choice="required", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="response format"):
        c.chat.completions.create(model="tiny-chat", messages=MSGS, tools=[WEATHER], tool_choice="required",
                                  response_format={"type": "json_object"}, max_tokens=4)


def capabilities(replica) -> dict:
    models = httpx.get(replica.url + "/v1/models", timeout=30).json()["data"]
    assert len(models) == 1
    return models[0]["capabilities"]


def test_model_list_says_what_the_model_supports(llm):
    caps = capabilities(llm)
    assert caps["tool_calling"]["tool_parser"] == "hermes"  # read from the checkpoint's template
    assert set(caps["tool_calling"]["tool_choice"]) == {"auto", "none", "required", "function"}
    assert set(caps["structured_outputs"]["response_format"]) == {"json_object", "json_schema"}
    assert "guided_regex" in caps["structured_outputs"]["extra_body"]
    assert caps["responses_api"] == {"store": False}
    # The tiny checkpoint's generation_config.json sets no sampling: the package default bound alone applies.
    assert caps["default_sampling"] == {"max_tokens": 1024}


def test_configured_mistral_parser(tiny_checkpoint: Path, tmp_path: Path, replica_factory):
    """`engine.tool_parser: mistral`: calls are `[TOOL_CALLS] [...]`, forced by grammar, whole and streamed alike."""
    pkg = write_package(tmp_path / "mi", f"""
        name: mi
        engine: {{kind: native, checkpoint: {tiny_checkpoint}, served_model_name: mi, max_model_len: 2048,
                  kv_cache_memory: 64Mi, tool_parser: mistral}}
        """)
    rep = replica_factory(pkg)
    assert capabilities(rep)["tool_calling"]["tool_parser"] == "mistral"
    c = client_for(rep)
    named = {"type": "function", "function": {"name": "get_weather"}}
    kw = dict(model="mi", messages=MSGS, tools=[TIME, WEATHER], tool_choice=named, temperature=0, max_tokens=120)
    ch = c.chat.completions.create(**kw).choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1 and not ch.message.content
    valid_call(ch.message.tool_calls[0], WEATHER)
    deltas = [d for chunk in c.chat.completions.create(**kw, stream=True) for choice in chunk.choices
              for d in choice.delta.tool_calls or []]
    whole = ch.message.tool_calls[0].function.arguments
    assert "".join(d.function.arguments or "" for d in deltas if d.function) == whole
    for ch in c.chat.completions.create(model="mi", messages=MSGS, tools=[TIME, WEATHER], tool_choice="required",
                                        parallel_tool_calls=False, n=3, temperature=1.0, max_tokens=300).choices:
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1, ch.message
        call = ch.message.tool_calls[0]
        valid_call(call, WEATHER if call.function.name == "get_weather" else TIME)
    # A past call goes back into the prompt in the same format.
    history = [*MSGS, ch.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"ok": true}'}]
    ids = httpx.post(rep.url + "/tokenize", json={"messages": history}).json()["tokens"]
    assert '[TOOL_CALLS] [{"name": "' in httpx.post(rep.url + "/detokenize", json={"tokens": ids}).json()["prompt"]


def test_configured_llama3_json_parser(tiny_checkpoint: Path, tmp_path: Path, replica_factory):
    """`engine.tool_parser: llama3_json` overrides the template's format: calls are bare JSON objects."""
    pkg = write_package(tmp_path / "l3", f"""
        name: l3
        engine: {{kind: native, checkpoint: {tiny_checkpoint}, served_model_name: l3, max_model_len: 2048,
                  kv_cache_memory: 64Mi, tool_parser: llama3_json, default_sampling: {{top_k: 5, max_tokens: 300}}}}
        """)
    rep = replica_factory(pkg)
    caps = capabilities(rep)
    assert caps["tool_calling"]["tool_parser"] == "llama3_json"
    assert caps["default_sampling"] == {"top_k": 5, "max_tokens": 300}
    c = client_for(rep)
    named = {"type": "function", "function": {"name": "get_weather"}}
    kw = dict(model="l3", messages=MSGS, tools=[WEATHER], tool_choice=named, temperature=0, max_tokens=120)
    r = c.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
    valid_call(ch.message.tool_calls[0], WEATHER)
    args = "".join(d.function.arguments or "" for chunk in c.chat.completions.create(**kw, stream=True)
                   for choice in chunk.choices for d in choice.delta.tool_calls or [] if d.function)
    assert args == ch.message.tool_calls[0].function.arguments


# ---- parsers, no model -------------------------------------------------------------------------
HERMES = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>{"name": "g", ' \
         '"arguments": {"b": "x<y"}}</tool_call>\n'


def test_hermes_parse_whole_and_streamed_agree():
    content, calls = parse_text(HERMES, "hermes")
    assert content == "Sure." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("f", {"a": 1}), ("g", {"b": "x<y"})]

    async def streamed(step: int) -> tuple[str, list[tuple[str, str]]]:
        async def chunks():
            yield {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
            for i in range(0, len(HERMES), step):
                yield {"choices": [{"index": 0, "delta": {"content": HERMES[i:i + step]}, "finish_reason": None}]}
            yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}

        text, acc, fin, pieces = "", {}, None, 0
        async for ch in apply_to_stream(chunks(), "hermes"):
            for part in ch["choices"]:
                text += part["delta"].get("content") or ""
                fin = part.get("finish_reason") or fin
                for d in part["delta"].get("tool_calls") or []:
                    pieces += bool(d.get("function", {}).get("arguments"))
                    a = acc.setdefault(d["index"], ["", ""])
                    a[0] += d.get("function", {}).get("name") or ""
                    a[1] += d.get("function", {}).get("arguments") or ""
        assert fin == "tool_calls"
        if step == 1:  # the arguments stream as they form, not in one piece at the end
            assert pieces > 10
        return text, [tuple(acc[k]) for k in sorted(acc)]

    for step in (1, 3, 7, len(HERMES)):
        assert asyncio.run(streamed(step)) == (content, [(c.name, c.arguments) for c in calls])


def test_mistral_whole_streamed_and_markerless():
    text = '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": "x"}}]'
    content, calls = parse_text(text, "mistral")
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": 1}), ("g", {"b": "x"})]
    assert [(c.name, c.arguments) for c in parse_text(text[len("[TOOL_CALLS] "):], "mistral")[1]] == [
        (c.name, c.arguments) for c in calls]  # a detokenizer that drops the special token
    assert parse_text("[1] is a list", "mistral") == ("[1] is a list", [])
    assert parse_text("[TOOL_CALLS] [oops", "mistral") == ("[TOOL_CALLS] [oops", [])

    async def stream(pieces: list[str]) -> list[dict]:
        async def chunks():
            yield {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
            for i, p in enumerate(pieces):
                yield {"choices": [{"index": 0, "delta": {"content": p}, "logprobs": None,
                                    "finish_reason": "stop" if i == len(pieces) - 1 else None}]}
        return [c async for c in apply_to_stream(chunks(), "mistral")]

    out = asyncio.run(stream([text[i:i + 3] for i in range(0, len(text), 3)]))
    deltas = [d for c in out for ch in c["choices"] for d in ch["delta"].get("tool_calls") or []]
    assert [d["function"].get("name") for d in deltas if d.get("id")] == ["f", "g"]
    assert not any(ch["delta"].get("content") for c in out[1:] for ch in c["choices"])
    assert out[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert choose_parser("{{ '[TOOL_CALLS]' }}") == "mistral" and choose_parser(None, "mistral") == "mistral"


def test_mistral_templates_get_nine_character_call_ids():
    """Mistral's templates raise unless every tool call id is 9 letters or digits: ids are mapped, consistently."""
    from ballast.openai.schemas import ChatCompletionRequest
    from ballast.runtime.llm_tools import template_messages

    template = ("{%- for m in messages %}{%- for c in m.tool_calls or [] %}{%- if c.id|length != 9 %}"
                "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}"
                "[TOOL_CALLS] {{ c.id }}{%- endfor %}{%- if m.role == 'tool' %}[TOOL_RESULTS] {{ m.tool_call_id }}"
                "{%- endif %}{%- endfor %}{# tools #}")
    req = ChatCompletionRequest.model_validate({"messages": [
        *MSGS, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_0123456789abcdef", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_0123456789abcdef", "content": "ok"}]})
    msgs, _ = template_messages(req.messages, None, template, "mistral")
    ids = {msgs[1]["tool_calls"][0]["id"], msgs[2]["tool_call_id"]}
    assert len(ids) == 1 and all(len(i) == 9 and i.isalnum() for i in ids)

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    import jinja2
    env = jinja2.Environment()
    env.globals["raise_exception"] = raise_exception
    assert "[TOOL_RESULTS] " + ids.pop() in env.from_string(template).render(messages=msgs)
    hermes, _ = template_messages(req.messages, None, template, "hermes")
    with pytest.raises(ValueError, match="length 9"):  # what a Mistral template does with OpenAI-style ids
        env.from_string(template).render(messages=hermes)


def test_plain_text_and_llama3_json():
    assert parse_text("no calls <tool here", "hermes") == ("no calls <tool here", [])
    assert parse_text("<tool_call>{broken</tool_call>", "hermes")[1] == []
    content, calls = parse_text('{"name": "f", "parameters": {"x": 2}}', "llama3_json")
    assert content is None and calls[0].name == "f" and json.loads(calls[0].arguments) == {"x": 2}
    assert parse_text("hello {", "llama3_json") == ("hello {", [])
    assert choose_parser("{{ '<|python_tag|>' }}") == "llama3_json"
    assert choose_parser("<tool_call>") == "hermes" and choose_parser(None, "llama3_json") == "llama3_json"
