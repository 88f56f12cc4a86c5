"""The Responses API on an LLM replica, with `client.responses.create` (tiny random Llama)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.runtime.test_llm_serving import client_for
from tests.runtime.test_structured import SCHEMA, check_person
from tests.runtime.test_tools import WEATHER
from tests.runtime.test_tools import llm as llm  # the same replica package (a fresh replica for this module)

FLAT_WEATHER = {"type": "function", **WEATHER["function"]}


def test_text_whole_and_streamed(llm):
    c = client_for(llm)
    r = c.responses.create(model="tiny-chat", input="Say hi.", instructions="Be brief.", max_output_tokens=8,
                           temperature=0)
    assert r.object == "response" and r.status in ("completed", "incomplete") and r.store is False
    assert r.output[0].type == "message" and r.output_text
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"

    events = list(c.responses.create(model="tiny-chat", input="Say hi.", instructions="Be brief.",
                                     max_output_tokens=8, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == r.output_text
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens == r.usage.output_tokens


def test_json_schema_format(llm):
    c = client_for(llm)
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}}
    r = c.responses.create(model="tiny-chat", input=[{"role": "user", "content": "A person."}], text=fmt,
                           max_output_tokens=200, temperature=1.0)
    assert r.status == "completed"
    check_person(r.output_text)
    events = list(c.responses.create(model="tiny-chat", input="A person.", text=fmt, max_output_tokens=200,
                                     temperature=1.0, stream=True))
    check_person("".join(e.delta for e in events if e.type == "response.output_text.delta"))


def test_function_tool_whole_and_streamed(llm):
    c = client_for(llm)
    kw = dict(model="tiny-chat", input="Weather in Oslo?", tools=[FLAT_WEATHER], temperature=0,
              tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=120)
    r = c.responses.create(**kw)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["function"]["parameters"])

    events = list(c.responses.create(**kw, stream=True))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert args == calls[0].arguments and done[0].arguments == args and done[0].name == "get_weather"
    assert events[-1].type == "response.completed"
    assert [o.type for o in events[-1].response.output] == ["function_call"]

    # The call and its output go back as input items.
    follow = c.responses.create(model="tiny-chat", tools=[FLAT_WEATHER], tool_choice="none", max_output_tokens=8,
                                input=[{"role": "user", "content": "Weather in Oslo?"},
                                       {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
                                        "arguments": calls[0].arguments},
                                       {"type": "function_call_output", "call_id": calls[0].call_id,
                                        "output": '{"temp_c": 3}'}])
    alone = c.responses.create(model="tiny-chat", tools=[FLAT_WEATHER], tool_choice="none", max_output_tokens=1,
                               input="Weather in Oslo?")
    assert follow.output[0].type == "message" and follow.usage.input_tokens > alone.usage.input_tokens


def test_stored_responses_are_refused(llm):
    c = client_for(llm)
    with pytest.raises(openai.BadRequestError, match="stores no responses") as e:
        c.responses.create(model="tiny-chat", input="hi", previous_response_id="resp_123")
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError, match="stores no responses"):
        c.responses.create(model="tiny-chat", input="hi", store=True)
