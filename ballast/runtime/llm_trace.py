"""An LLM replica's part of a trace: GenAI attributes on its server span, and the engine's phases as spans.

Only built when tracing is on and the request has a server span (`ballast.observe.tracing`). The engine records
plain timestamps in its own thread (`RequestTimes`); the spans for queue wait, prefill and decode are made
here, on the event loop, once the engine request has finished.
"""

from __future__ import annotations

from typing import Any

from ballast.observe.tracing import current_span, current_tracer, record_span

PROVIDER = "ballast"


class RequestTrace:
    """One OpenAI call on the replica: request attributes now, usage and finish reasons as its prompts finish."""

    def __init__(self, span: Any, tracer: Any, req: Any, model: str, response_id: str, chat: bool):
        self.span = span
        self.tracer = tracer
        self.input_tokens = 0
        self.output_tokens = 0
        self.reasons: list[str] = []
        op = "chat" if chat else "text_completion"
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": op, "gen_ai.provider.name": PROVIDER, "gen_ai.system": PROVIDER,
            "gen_ai.request.model": req.model or model, "gen_ai.response.model": model,
            "gen_ai.response.id": response_id,
        }
        for name, value in (("temperature", req.temperature), ("top_p", req.top_p), ("seed", req.seed),
                            ("max_tokens", req.max_new_tokens())):
            if value is not None:
                attrs[f"gen_ai.request.{name}"] = value
        if req.n != 1:
            attrs["gen_ai.request.choice.count"] = req.n
        span.update_name(f"{op} {model}")
        span.set_attributes(attrs)

    def finished(self, out: Any, output_tokens: int, reasons: list[str]) -> None:
        """One engine request (one prompt) is over: add its usage and record its phases."""
        self.input_tokens += len(out.prompt_token_ids)
        self.output_tokens += output_tokens
        self.reasons += reasons
        self.span.set_attributes({"gen_ai.usage.input_tokens": self.input_tokens,
                                  "gen_ai.usage.output_tokens": self.output_tokens,
                                  "gen_ai.response.finish_reasons": self.reasons})
        if out.times is not None:
            self._engine_spans(out, output_tokens)

    def _engine_spans(self, out: Any, output_tokens: int) -> None:
        t = out.times
        engine = record_span(self.tracer, self.span, "ballast.engine", t.queued_ns, t.finished_ns, {
            "ballast.engine.request_id": out.request_id,
            "gen_ai.usage.input_tokens": len(out.prompt_token_ids),
            "gen_ai.usage.output_tokens": output_tokens,
            "ballast.engine.cached_tokens": out.num_cached_tokens or 0,
        })
        if not t.scheduled_ns:
            return
        record_span(self.tracer, engine, "ballast.engine.queue_wait", t.queued_ns, t.scheduled_ns)
        prefill_end = t.first_token_ns or t.finished_ns
        record_span(self.tracer, engine, "ballast.engine.prefill", t.scheduled_ns, prefill_end,
                    {"ballast.engine.prompt_tokens": len(out.prompt_token_ids)})
        if t.first_token_ns:
            record_span(self.tracer, engine, "ballast.engine.decode", t.first_token_ns, t.finished_ns,
                        {"ballast.engine.output_tokens": output_tokens})


def start(req: Any, model: str, response_id: str, chat: bool) -> RequestTrace | None:
    """A trace record for this call when the request is traced, else None (tracing off costs this one check)."""
    span = current_span()
    if span is None:
        return None
    return RequestTrace(span, current_tracer(), req, model, response_id, chat)
