"""Tool calling request schemas: `tools`, `tool_choice`, `parallel_tool_calls` and tool-call messages.

Kept apart from `schemas` so chat completions and the Responses API share them. Every problem is a
400 naming the parameter (a named tool that is not in `tools`, `required` without tools, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ballast.openai.errors import APIError

_CONFIG = ConfigDict(extra="allow", allow_inf_nan=False)
MAX_TOOLS = 128


class FunctionDef(BaseModel):
    model_config = _CONFIG
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def params_schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}


class Tool(BaseModel):
    model_config = _CONFIG
    type: Literal["function"]
    function: FunctionDef


@dataclass
class ToolRequest:
    """What a request asks of tools: the functions, the choice (auto/none/required/a name), parallelism."""

    functions: list[FunctionDef] = field(default_factory=list)
    choice: str = "auto"  # auto | none | required | named
    named: str | None = None
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.functions) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.active and self.choice in ("required", "named")

    def openai_tools(self) -> list[dict[str, Any]]:
        """The tools as chat templates expect them (OpenAI's chat shape)."""
        return [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in self.functions]


def _bad(msg: str, param: str) -> APIError:
    return APIError(400, msg, param=param, code="invalid_request")


def parse_tools(tools: Any, tool_choice: Any, parallel: Any, *, flat: bool = False) -> ToolRequest:
    """Validate the tool fields of a request. `flat`: the Responses API's `{"type": "function", "name": ...}`."""
    functions = _parse_functions(tools, flat)
    req = ToolRequest(functions)
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise _bad("`parallel_tool_calls` must be a boolean", "parallel_tool_calls")
        req.parallel = parallel
    if tool_choice is None:
        return req
    req.choice, req.named = _parse_choice(tool_choice, [f.name for f in functions], flat)
    if req.choice == "required" and not functions:
        raise _bad("`tool_choice` is required but no `tools` were given", "tool_choice")
    return req


def _parse_functions(tools: Any, flat: bool) -> list[FunctionDef]:
    """The `tools` list, each checked, names unique (a call must say unambiguously which it means)."""
    if tools is None:
        tools = []
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise _bad(f"`tools` must be a list of at most {MAX_TOOLS} tools", "tools")
    functions = [_parse_function(i, t, flat) for i, t in enumerate(tools)]
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise _bad("tool names must be unique", "tools")
    return functions


def _parse_function(i: int, t: Any, flat: bool) -> FunctionDef:
    """Tool `i`; a validation error names the exact field (`tools.3.function.name`)."""
    if not isinstance(t, dict) or t.get("type") != "function":
        raise _bad(f"`tools.{i}`: only tools of type function are supported", f"tools.{i}.type")
    try:
        if flat:
            return FunctionDef.model_validate({k: v for k, v in t.items() if k != "type"})
        return Tool.model_validate(t).function
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise _bad(f"invalid value for `tools.{i}.{loc}`: {err['msg']}", f"tools.{i}") from None


def _parse_choice(tool_choice: Any, names: list[str], flat: bool) -> tuple[str, str | None]:
    """`tool_choice` (not None) as (choice, named function): a mode string, or a function that must be in `tools`."""
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise _bad("`tool_choice` must be auto, none, required or a named function", "tool_choice")
        return tool_choice, None
    if not (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"):
        raise _bad("`tool_choice` must be auto, none, required or a named function", "tool_choice")
    fn = tool_choice.get("function") if not flat else tool_choice
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise _bad("a named `tool_choice` needs the function's name", "tool_choice")
    if name not in names:
        raise _bad(f"`tool_choice` names the function {name!r}, which is not in `tools`", "tool_choice")
    return "named", name


def message_tool_calls(extra: dict[str, Any], index: int) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls`, checked, with arguments decoded to objects for the template."""
    calls = extra.get("tool_calls")
    if not calls:
        return []
    param = f"messages.{index}.tool_calls"
    if not isinstance(calls, list):
        raise _bad(f"`{param}` must be a list", param)
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"each of `{param}` needs function.name", param)
        args: Any = fn.get("arguments") or "{}"
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                raise _bad(f"`{param}`: function.arguments must be JSON", param) from None
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out
