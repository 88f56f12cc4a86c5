"""Parsing request JSON safely: one reader for the replica runtime, the gateway and the platform's REST API.

`json.loads` accepts documents that break the code after it: nesting thousands deep (a RecursionError
later, in user code, pydantic or when the result is encoded) and lone UTF-16 surrogates such as
`"\\ud800"` (strings that cannot be encoded as UTF-8, so logging, storing or echoing them fails). Both
are refused here with a 400, at a cost only for the rare bodies that could contain them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ballast.openai import APIError

MAX_DEPTH = 128
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def parse_json(body: bytes) -> Any:
    """Decode a request body; a 400 `invalid_json` for bad JSON, deep nesting or lone surrogates."""
    if not body:
        raise APIError(400, "request body is empty; send a JSON document", code="invalid_json")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise _too_deep() from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    # bytes.count runs in C: only bodies with enough brackets to be deep, or a surrogate escape, are walked.
    deep = body.count(b"[") + body.count(b"{") > MAX_DEPTH
    surrogates = _SURROGATE_ESCAPE.search(body) is not None
    if deep or surrogates:
        _check(value, check_depth=deep, check_strings=surrogates)
    return value


def _too_deep() -> APIError:
    return APIError(400, f"request body nests deeper than {MAX_DEPTH} levels", code="invalid_json")


def _check(value: Any, *, check_depth: bool, check_strings: bool) -> None:
    """Iterative walk (a recursive one would itself overflow on the documents it must refuse)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if check_depth and depth > MAX_DEPTH:
                raise _too_deep()
            for k, v in item.items():
                if check_strings:
                    _check_text(k)
                stack.append((v, depth + 1))
        elif isinstance(item, list):
            if check_depth and depth > MAX_DEPTH:
                raise _too_deep()
            stack.extend((v, depth + 1) for v in item)
        elif check_strings and isinstance(item, str):
            _check_text(item)


def _check_text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "request body contains a lone UTF-16 surrogate (\\ud800-\\udfff) in a string; "
                            "send valid Unicode", code="invalid_json") from None
