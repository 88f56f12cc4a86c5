"""Structured outputs at the replica edge: the request's constraint → a compiled engine grammar.

OpenAI's `response_format` (`json_object`, `json_schema`) and vLLM's `guided_json`, `guided_regex`,
`guided_choice` and `structured_outputs` all become one `GuidedSpec`. Compiling runs in a worker
thread, so the event loop and the engine's step loop never wait on a new schema; the engine caches
compiled grammars, so a repeated schema costs a dictionary lookup.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ballast.engine.guided import GuidedSpec
from ballast.openai import APIError


def _bad(msg: str, param: str) -> APIError:
    return APIError(400, msg, param=param, code="invalid_request")


def _schema_of(value: Any, param: str) -> dict[str, Any]:
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError:
            raise _bad(f"`{param}` must be a JSON schema (an object, or its JSON text)", param) from None
    if not isinstance(value, dict):
        raise _bad(f"`{param}` must be a JSON schema object", param)
    return value


def _choice(value: Any, param: str) -> GuidedSpec:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise _bad(f"`{param}` must be a non-empty list of non-empty strings", param)
    return GuidedSpec.choice(value, param)


def _regex(value: Any, param: str) -> GuidedSpec:
    if not isinstance(value, str) or not value:
        raise _bad(f"`{param}` must be a non-empty regular expression", param)
    return GuidedSpec("regex", value, param)


def _response_format(rf: dict[str, Any]) -> GuidedSpec | None:
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return GuidedSpec.json_schema({"type": "object"}, "response_format")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise _bad("`response_format.json_schema.schema` is required for type json_schema",
                       "response_format.json_schema")
        return GuidedSpec.json_schema(_schema_of(js["schema"], "response_format.json_schema.schema"),
                                      "response_format.json_schema.schema")
    raise _bad(f"`response_format.type` {kind!r} is not supported; use text, json_object or json_schema",
               "response_format.type")


def _structured_outputs(so: Any) -> GuidedSpec:
    if not isinstance(so, dict) or len([k for k, v in so.items() if v is not None]) != 1:
        raise _bad("`structured_outputs` must set exactly one of json, regex, choice", "structured_outputs")
    key, value = next((k, v) for k, v in so.items() if v is not None)
    param = f"structured_outputs.{key}"
    if key == "json":
        return GuidedSpec.json_schema(_schema_of(value, param), param)
    if key == "json_object" and value:
        return GuidedSpec.json_schema({"type": "object"}, param)
    if key == "regex":
        return _regex(value, param)
    if key == "choice":
        return _choice(value, param)
    raise _bad(f"`{param}` is not supported; use json, regex or choice", param)


def _guided_json(value: Any, key: str) -> GuidedSpec:
    return GuidedSpec.json_schema(_schema_of(value, key), key)


def _guided_grammar(value: Any, key: str) -> GuidedSpec:
    raise _bad("`guided_grammar` is not supported; use guided_json, guided_regex or guided_choice", key)


# vLLM's extra constraint fields, in the order they are read (which decides the one named in a conflict).
_VLLM_PARSERS: dict[str, Callable[[Any, str], GuidedSpec]] = {
    "guided_json": _guided_json,
    "guided_regex": _regex,
    "guided_choice": _choice,
    "guided_grammar": _guided_grammar,
    "structured_outputs": lambda value, key: _structured_outputs(value),
}


def guided_spec(req: Any) -> GuidedSpec | None:
    """The one constraint a request asks for, or None; asking for two is a 400."""
    extra = req.model_extra or {}
    specs: list[GuidedSpec] = []
    rf = getattr(req, "response_format", None) or extra.get("response_format")  # completions: an extra
    if rf:
        if not isinstance(rf, dict):
            raise _bad("`response_format` must be an object", "response_format")
        spec = _response_format(rf)
        if spec is not None:
            specs.append(spec)
    specs += [parse(extra[key], key) for key, parse in _VLLM_PARSERS.items() if extra.get(key) is not None]
    if len(specs) > 1:
        raise _bad(f"send one constraint, not `{specs[0].param}` and `{specs[1].param}` together", specs[1].param)
    return specs[0] if specs else None


async def compile_spec(engine: Any, spec: GuidedSpec) -> Any:
    """Compile (or fetch from the cache) in a worker thread; a spec the library cannot enforce is a 400."""
    from ballast.engine import EngineError

    try:
        return await asyncio.to_thread(engine.compile_grammar, spec)
    except EngineError as e:
        raise APIError(400, str(e), param=e.param or spec.param, code=e.code) from None


async def attach(engine: Any, req: Any, params: Any, forced: GuidedSpec | None = None) -> Any:
    """Set `params.guided` from the request's constraint (or `forced`, a tool call grammar); returns params."""
    spec = guided_spec(req)
    if spec is not None and forced is not None:
        raise _bad("a forced `tool_choice` cannot be combined with a response format", "tool_choice")
    spec = spec or forced
    if spec is not None:
        params.guided = await compile_spec(engine, spec)
    return params
