"""The replica's OpenAPI document (`GET /openapi.json`): every route it serves, with every status it answers.

Built from what the host serves (a Python model's methods are known once it has loaded), so a client
generator or a fuzzer (schemathesis runs against it in the tests) sees exactly this replica's API:
request bodies as strict as the server, and the OpenAI error schema for each error status.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ballast.openai.responses import ResponsesRequest
from ballast.openai.schemas import ChatCompletionRequest, CompletionRequest
from ballast.runtime.model import OPENAI_METHODS

ERROR_REF = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]},
        },
    }},
}
_REASONS = {
    400: "Invalid request: bad JSON, a body of the wrong shape or an unsupported parameter.",
    401: "Missing or invalid API key.",
    403: "The key may not do this.",
    404: "Not found.",
    409: "Conflict with the current state.",
    413: "The request body is over the size limit.",
    429: "At capacity: retry after `Retry-After` seconds.",
    500: "The model raised (the message names the request id; the trace is in the log).",
    503: "Loading, failed to load, or shutting down.",
    504: "The request took longer than request_timeout_s.",
}
# Refusals the runtime itself answers on every inference route.
INFERENCE_ERRORS = (400, 413, 429, 500, 503, 504)
_STATUS = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"type": "string"}, "reason": {"type": ["string", "null"]},
                   "load_seconds": {"type": ["number", "null"]}},
}
# A truthy value of these is refused with 400 unsupported_parameter (see ballast.openai.schemas).
_FALSY = {"anyOf": [{"type": "null"}, {"const": False}, {"const": 0}, {"const": ""},
                    {"type": "array", "maxItems": 0}, {"type": "object", "maxProperties": 0}]}


def error_responses(*statuses: int) -> dict[str, Any]:
    """OpenAPI responses for error statuses, each with the OpenAI error body."""
    return {str(s): {"description": _REASONS.get(s, "Error."), "content": {"application/json": {"schema": ERROR_REF}}}
            for s in statuses}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _get(summary: str, ok: dict[str, Any], *errors: int, status_schema: bool = False) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": ok}
    if status_schema:
        responses["503"] = {"description": "Not live/ready; `reason` says why.",
                            "content": {"application/json": {"schema": _STATUS}}}
    responses.update(error_responses(*errors))
    return {"get": {"summary": summary, "responses": responses}}


def _inference(summary: str, body: dict[str, Any], *, stream: bool, extra: tuple[int, ...] = ()) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {}}}
    if stream:
        content["text/event-stream"] = {"schema": {}}  # each event's data: a JSON chunk, then [DONE]
        content["application/x-ndjson"] = {"schema": {}}
    responses = {"200": {"description": "The result, or a stream when the model streams.", "content": content}}
    responses.update(error_responses(*sorted({*INFERENCE_ERRORS, *extra})))
    return {"post": {"summary": summary, "requestBody": _json_body(body), "responses": responses}}


def _pydantic(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    return schema


def _llm_body(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    """The engine's request schema, with what the validators enforce beyond pydantic's own schema."""
    schema = _pydantic(model, components)
    props = schema["properties"]
    props["stop"] = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                               {"type": "null"}]}
    for name in ("functions", "logit_bias", "audio", "prediction"):
        props.setdefault(name, _FALSY)
    if model is ChatCompletionRequest:  # validated in ballast.openai.tools
        props["tools"] = {"type": ["array", "null"], "items": {"type": "object"}}
        props["tool_choice"] = {"anyOf": [{"enum": [None, "none", "auto", "required"]}, {"type": "object"}]}
    return schema


def _responses_body(components: dict[str, Any]) -> dict[str, Any]:
    """The Responses request: nothing is stored, so nothing can be continued or kept."""
    schema = _pydantic(ResponsesRequest, components)
    props = schema["properties"]
    props["previous_response_id"] = {"type": "null"}
    props["store"] = {"enum": [None, False]}
    for name in ("background", "conversation", "prompt", "reasoning"):
        props.setdefault(name, _FALSY)
    return schema


def _llm_paths(vocab_size: int | None) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "integer", "minimum": 0}
    if vocab_size:
        item["maximum"] = vocab_size - 1
    token_ids = {"type": "array", "items": item}
    return {
        "/v1/models": _get("The served model.", {"description": "An OpenAI model list.",
                                                 "content": {"application/json": {"schema": {"type": "object"}}}}),
        "/tokenize": {"post": {
            "summary": "Token ids of a prompt (or of chat messages rendered with the template).",
            "requestBody": _json_body({"type": "object", "properties": {
                "prompt": {"type": ["string", "null"]},
                "messages": {"type": ["array", "null"], "items": {"type": "object"}, "minItems": 1, "maxItems": 4096},
                "model": {"type": ["string", "null"], "maxLength": 512},
                "add_special_tokens": {"type": "boolean"}}}),
            "responses": {"200": {"description": "tokens, count, max_model_len", "content": {"application/json": {
                "schema": {"type": "object", "required": ["tokens", "count"],
                           "properties": {"tokens": token_ids, "count": {"type": "integer"}}}}}},
                          **error_responses(400, 413, 503)},
        }},
        "/detokenize": {"post": {
            "summary": "Text of token ids.",
            "requestBody": _json_body({"type": "object", "required": ["tokens"], "properties": {"tokens": token_ids}}),
            "responses": {"200": {"description": "prompt", "content": {"application/json": {
                "schema": {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}}}}},
                          **error_responses(400, 413, 503)},
        }},
    }


def replica_openapi(host: Any, *, engine_kind: str | None, served: set[str]) -> dict[str, Any]:
    """The document for a host serving `served` (`predict` and/or OpenAI method names)."""
    components: dict[str, Any] = {"Error": ERROR_SCHEMA}
    text = {"text/plain": {"schema": {"type": "string"}}}
    paths: dict[str, Any] = {
        "/health": _get("Liveness, as vLLM answers it (load balancers probe it).",
                        {"description": "Alive.", "content": {"application/json": {"schema": _STATUS}}},
                        status_schema=True),
        "/health/live": _get("Liveness: 503 once the model failed to load.",
                             {"description": "Alive.", "content": {"application/json": {"schema": _STATUS}}},
                             status_schema=True),
        "/health/ready": _get("Readiness: 503 with a reason while loading, after a failure or while stopping.",
                              {"description": "Ready.", "content": {"application/json": {"schema": _STATUS}}},
                              status_schema=True),
        "/metrics": _get("Prometheus metrics.", {"description": "Prometheus text format.", "content": text}),
        "/openapi.json": _get("This document.", {"description": "OpenAPI 3.1.",
                                                  "content": {"application/json": {"schema": {"type": "object"}}}}),
    }
    if "predict" in served:
        paths["/predict"] = _inference("Run the model on any JSON document.", {}, stream=True)
    llm = engine_kind == "native"
    bodies: dict[str, type[BaseModel]] = {"chat_completions": ChatCompletionRequest, "completions": CompletionRequest}
    for method, path in OPENAI_METHODS.items():
        if method not in served:
            continue
        if llm and method == "responses":
            paths[path] = _inference("OpenAI Responses API (nothing is stored).", _responses_body(components),
                                     stream=True, extra=(404,))
        elif llm and method in bodies:
            paths[path] = _inference(f"OpenAI {path}.", _llm_body(bodies[method], components), stream=True,
                                     extra=(404,))
        else:
            paths[path] = _inference(f"OpenAI {path} (the model's {method}()).", {"type": "object"}, stream=True)
    if engine_kind == "command":  # proxied as they are to the external engine
        anything: dict[str, Any] = {"application/json": {"schema": {}}}
        paths["/v1/models"] = _get("The engine's models.", {"description": "As the engine answers.",
                                                            "content": anything})
        for path in ("/tokenize", "/detokenize"):
            paths[path] = {"post": {"summary": "Passed to the engine.", "requestBody": _json_body({"type": "object"}),
                                    "responses": {"200": {"description": "As the engine answers.", "content": anything},
                                                  **error_responses(400, 413, 503)}}}
    if llm:
        engine = getattr(host, "engine", None)  # loaded: the tokenizer bounds the token ids /detokenize takes
        paths.update(_llm_paths(engine.tokenizer.vocab_size if engine is not None else None))
    title = f"Ballast replica: {host.package.name}"
    return {"openapi": "3.1.0", "info": {"title": title, "version": "1"}, "paths": paths,
            "components": {"schemas": components}}
