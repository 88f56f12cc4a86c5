"""Constrained decoding in the engine core: batch masks, per-sequence matchers, the grammar cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ballast.engine import LLM, EngineError, SamplingParams
from tests.engine.conftest import assert_no_leaks

llguidance = pytest.importorskip("llguidance")
from ballast.engine.guided import GuidedSpec  # noqa: E402

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "tag": {"enum": ["a", "b", "c"]}},
          "required": ["n", "tag"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(tiny: Path) -> LLM:
    return LLM(str(tiny), kv_cache_bytes=32 << 20, block_size=8)


def test_constrained_rows_follow_the_grammar_and_free_rows_are_untouched(llm: LLM):
    g = llm.engine.grammars.compile(GuidedSpec.json_schema(SCHEMA))
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = llm.generate(["the cat", "a dog"], free)
    mixed = llm.generate(["the cat", "x y z", "a dog"],
                         [free, SamplingParams(n=3, max_tokens=60, temperature=1.0, seed=5, guided=g), free])
    assert [o.outputs[0].token_ids for o in alone] == [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids]
    for c in mixed[1].outputs:  # n=3: each sequence its own matcher
        obj = json.loads(c.text)
        assert c.finish_reason == "stop" and 0 <= obj["n"] <= 999 and obj["tag"] in "abc"
    assert_no_leaks(llm)


def test_regex_choice_and_length(llm: LLM):
    gr = llm.engine.grammars
    outs = llm.generate(["p"] * 4, SamplingParams(max_tokens=20, temperature=1.0,
                                                  guided=gr.compile(GuidedSpec("regex", r"[a-f]{4}[0-9]"))))
    assert all(re.fullmatch(r"[a-f]{4}[0-9]", o.outputs[0].text) for o in outs)
    outs = llm.generate(["p"] * 4, SamplingParams(max_tokens=20, temperature=1.0,
                                                  guided=gr.compile(GuidedSpec.choice(["red", "green blue"]))))
    assert {o.outputs[0].text for o in outs} <= {"red", "green blue"}
    cut = llm.generate(["p"], SamplingParams(max_tokens=2, temperature=0,
                                             guided=gr.compile(GuidedSpec.json_schema(SCHEMA))))[0].outputs[0]
    assert cut.finish_reason == "length" and cut.text.startswith("{")
    assert_no_leaks(llm)


def test_cache_and_unsupported_keywords(llm: LLM):
    gr = llm.engine.grammars
    hits = gr.hits
    a = gr.compile(GuidedSpec.json_schema({"type": "object", "properties": {"z": {"type": "string"}}}))
    b = gr.compile(GuidedSpec.json_schema({"type": "object", "properties": {"z": {"type": "string"}}}))
    assert gr.hits == hits + 1 and a.matcher() is not b.matcher()
    with pytest.raises(EngineError, match='"dependentSchemas"') as e:
        gr.compile(GuidedSpec.json_schema({"type": "object", "dependentSchemas": {"a": {}}}))
    assert e.value.code == "unsupported_schema" and e.value.param == "response_format"
    small = type(gr)(llm.engine.tokenizer.hf.to_str, gr.vocab_size, [0], cache_size=2)
    for i in range(3):
        small.compile(GuidedSpec("regex", f"x{i}"))
    small.compile(GuidedSpec("regex", "x0"))  # evicted (least recently used): compiled again
    assert small.misses == 4 and small.hits == 0
