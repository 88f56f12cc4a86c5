"""The platform's OpenAPI document, made true: each route declares the error statuses it answers (with
the OpenAI error body), validation failures are documented as the 400 they are (FastAPI would say 422),
and the key requirement is a security scheme, so generated clients and fuzzers see the real contract.
Bodies are read by the one JSON reader (openai/jsonio), so the platform refuses the malformed JSON a replica does."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.responses import Response

from ballast.openai.jsonio import parse_json
from ballast.platform.schemas import ErrorBody

_REASONS = {
    400: "Invalid request (the message names the parameter).",
    401: "Missing or invalid API key.",
    403: "The key lacks the admin scope, or the request needs a loopback client.",
    404: "No such deployment, version, environment, key or package.",
    409: "Conflicts with the current state (retry, or nothing to do).",
    413: "The package archive is over the upload limit.",
}


class CheckedJSONRoute(APIRoute):
    """Request bodies go through the one JSON reader (400 for deep nesting and lone surrogates)
    before FastAPI validates them; the parsed value is handed on, so nothing is parsed twice."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            ctype = request.headers.get("content-type", "")
            if self.body_field is not None and (not ctype or "json" in ctype):  # not the archive upload
                body = await request.body()
                if body:
                    request._json = parse_json(body)
            return await handler(request)

        return checked


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for these error statuses (401 and 403 are added to every keyed route)."""
    return {s: {"model": ErrorBody, "description": _REASONS.get(s, "Error.")} for s in statuses}


def install(app: FastAPI, public: set[str]) -> None:
    """Replace `app.openapi` with the corrected document; `public` paths need no key."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
        components = doc.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer",
                                                    "description": "An admin API key (`ballast up` prints one)."}}
        error_ref = {"$ref": "#/components/schemas/ErrorBody"}
        for path, ops in doc.get("paths", {}).items():
            for op in ops.values():
                responses = op.setdefault("responses", {})
                had_validation = responses.pop("422", None) is not None
                statuses = [400] if had_validation or op.get("requestBody") or op.get("parameters") else []
                if path not in public:
                    op["security"] = [{"apiKey": []}]
                    statuses += [401, 403]
                for s in statuses:
                    responses.setdefault(str(s), {"description": _REASONS[s],
                                                  "content": {"application/json": {"schema": error_ref}}})
        schemas.setdefault("ErrorBody", ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}"))
        schemas["ErrorBody"].pop("$defs", None)
        schemas.setdefault("ErrorDetail", ErrorBody.model_json_schema()["$defs"]["ErrorDetail"])
        app.openapi_schema = doc
        return doc

    app.openapi = build  # type: ignore[method-assign]
