"""What a request names and what the replica is sent: `model` strings and body rewrites.

`model` is a deployment (`chat`, its production environment), an environment (`chat@staging`) or a
version (`chat:3`). The replica knows its own model name, and the gateway needs the token counts of a
stream, so the body is sometimes rewritten on the way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ballast.gateway.routing import prefix_key
from ballast.openai import APIError

STREAMING_KINDS = ("chat_completions", "completions")


def parse_model(model: object) -> tuple[str, str, int | None]:
    """(deployment, environment, version or None) of a `model` string; a 400 when it is malformed."""
    if not model or not isinstance(model, str):
        raise APIError(400, "`model` is required: a deployment name (chat, chat@staging, chat:3)", param="model",
                       code="missing_model")
    name, env, version = model, "production", None
    if "@" in model:
        name, env = model.split("@", 1)
    elif ":" in model:
        name, _, v = model.partition(":")
        if not v.isdigit():
            raise APIError(400, f"`{model}`: a version is a number, as in {name}:3", param="model")
        version = int(v)
    return name, env, version


def model_of_path(params: Mapping[str, Any]) -> str:
    """The model a `/deployments/{name}[/environments/{env} | /versions/{version}]/...` path names, spelled as
    `model` is (`name`, `name@env`, `name:version`), so path and body targets resolve the same way."""
    if "env" in params:
        return f"{params['name']}@{params['env']}"
    if "version" in params:
        return f"{params['name']}:{params['version']}"
    return str(params["name"])


def affinity_key(by_prefix: bool, parsed: dict[str, Any] | None, session: str | None) -> bytes | None:
    """The replica-affinity key: the prompt prefix (or session) for prefix routing, else the session only."""
    if by_prefix:
        return prefix_key(parsed, session)
    return b"s:" + session.encode() if session else None


def rewrite_body(body: bytes, parsed: dict[str, Any] | None, kind: str, served: str | None) -> tuple[bytes, bool]:
    """(the body to send, whether to strip the usage chunk from the streamed answer).

    `model` becomes `served`, the name the replica answers to (`chat@staging` or `chat:3` name the
    deployment). A stream is asked for its usage chunk, which metering needs; when the client did not ask
    for it, it is taken out of the stream on the way back.
    """
    if parsed is None:
        return body, False
    rewrite = strip_usage = False
    if served and parsed.get("model") != served:
        parsed["model"] = served
        rewrite = True
    if kind in STREAMING_KINDS and parsed.get("stream"):
        opts = parsed.get("stream_options")
        opts = opts if isinstance(opts, dict) else {}
        if not opts.get("include_usage"):
            parsed["stream_options"] = {**opts, "include_usage": True}
            rewrite = strip_usage = True
    return (json.dumps(parsed).encode() if rewrite else body), strip_usage
