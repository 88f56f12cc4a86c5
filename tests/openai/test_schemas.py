"""Request validation at the edge: every numeric field in range and strictly typed, a 400 naming it."""

from __future__ import annotations

import pytest

from ballast.openai import APIError
from ballast.openai.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    parse_request,
)

MSGS = [{"role": "user", "content": "hi"}]


def refused(model: type, body: dict) -> APIError:
    with pytest.raises(APIError) as e:
        parse_request(model, body)
    assert e.value.status == 400
    return e.value


@pytest.mark.parametrize(("field", "value"), [
    ("seed", 2**63), ("seed", -(2**63) - 1), ("n", 0), ("n", 17), ("temperature", 2.5), ("top_p", 0),
    ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0), ("presence_penalty", 3), ("max_tokens", 0),
    ("max_tokens", 2**21), ("top_logprobs", 21), ("max_tokens", "5"), ("n", True), ("n", 2.0),
    ("temperature", "0.5"), ("stop_token_ids", [-1]), ("stop_token_ids", [True]), ("stop", ["a"] * 5),
    ("stop", [""]), ("logprobs", 1),
])
def test_chat_fields_out_of_range_name_the_field(field, value):
    err = refused(ChatCompletionRequest, {"messages": MSGS, field: value})
    assert err.param is not None and err.param.startswith(field)


def test_in_range_values_pass_and_bounds_are_inclusive():
    req = parse_request(ChatCompletionRequest, {"messages": MSGS, "seed": 2**63 - 1, "n": 16, "temperature": 2,
                                                "top_p": 1, "top_k": -1, "max_tokens": 1, "temperature_extra": 1})
    assert req.seed == 2**63 - 1 and req.temperature == 2.0
    assert parse_request(CompletionRequest, {"prompt": [[1, 2], [3]], "logprobs": 20}).prompts() == [[1, 2], [3]]


def test_nesting_and_surrogates_are_400s_naming_where():
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    assert "nests deeper" in refused(ChatCompletionRequest, {"messages": MSGS, "x": deep}).message
    err = refused(ChatCompletionRequest, {"messages": [{"role": "user", "content": "a\ud800"}]})
    assert err.param == "messages.0.content"


def test_tokenize_detokenize_and_embeddings_ranges():
    assert refused(TokenizeRequest, {"prompt": "a", "add_special_tokens": 1}).param == "add_special_tokens"
    assert refused(DetokenizeRequest, {"tokens": [2**40]}).param == "tokens"
    assert refused(DetokenizeRequest, {"tokens": ["1"]}).param.startswith("tokens")
    assert refused(EmbeddingRequest, {"input": "a", "dimensions": 0}).param == "dimensions"
    assert refused(EmbeddingRequest, {"input": "a", "encoding_format": "hex"}).param == "encoding_format"
    assert parse_request(EmbeddingRequest, {"input": ["a", "b"], "dimensions": 8}).dimensions == 8
