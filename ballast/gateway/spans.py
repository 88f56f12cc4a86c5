"""The gateway's part of a trace: GenAI attributes on its server span, and the `traceparent` to the replica.

The span itself is the request-id middleware's (one per request, only when tracing is on); this module names
it `{operation} {model}` as the GenAI semantic conventions ask, records the route it resolved to and, when
the answer has been relayed, the replica that served it and the token usage.
"""

from __future__ import annotations

from typing import Any

from ballast.gateway.metering import UsageCounts
from ballast.gateway.proxy import Outcome
from ballast.observe.tracing import TRACEPARENT, traceparent

# The gateway's request kinds → gen_ai.operation.name (None: not a GenAI call, e.g. a model's /predict).
OPERATIONS = {"chat_completions": "chat", "completions": "text_completion", "embeddings": "embeddings",
              "responses": "chat", "predict": None}
PROVIDER = "ballast"


def on_route(span: Any, kind: str, model: str | None, deployment: str, version: int,
             headers: dict[str, str]) -> dict[str, Any]:
    """The route is resolved: name the span and pass the trace on. Returns its attributes, set with the
    outcome's in `on_done` (one `set_attributes` per request: each call takes the span's lock and checks
    every value)."""
    op = OPERATIONS.get(kind)
    attrs: dict[str, Any] = {"ballast.deployment": deployment, "ballast.version": version}
    if op is not None:
        attrs["gen_ai.operation.name"] = op
        attrs["gen_ai.provider.name"] = attrs["gen_ai.system"] = PROVIDER
        if model:
            attrs["gen_ai.request.model"] = model
    span.update_name(f"{op or 'predict'} {model or deployment}")
    headers[TRACEPARENT] = traceparent(span)
    return attrs


def on_done(span: Any, attrs: dict[str, Any], o: Outcome, counts: UsageCounts) -> None:
    """The answer was relayed (or failed): the route, which replica served, and the tokens it reported (the
    middleware adds the status)."""
    if o.endpoint is not None:
        attrs["ballast.replica"] = o.endpoint.replica_id
    if counts.prompt_tokens or counts.completion_tokens:
        attrs["gen_ai.usage.input_tokens"] = counts.prompt_tokens
        attrs["gen_ai.usage.output_tokens"] = counts.completion_tokens
    if o.first_chunk_s is not None:
        attrs["ballast.time_to_first_chunk_s"] = o.first_chunk_s
    span.set_attributes(attrs)
