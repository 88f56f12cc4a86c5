"""Prometheus metrics of an LLM replica: token latencies, token counters and the engine's gauges.

Time to first token, time per output token, request duration and tokens per request are also exported under
the OpenTelemetry GenAI semantic-convention names (`gen_ai.server.time_to_first_token` →
`gen_ai_server_time_to_first_token_seconds`, ...), labelled by operation and model, so dashboards built for
those conventions work unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10, 30)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
# The bucket boundaries the GenAI semantic conventions advise for each metric.
GENAI_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
GENAI_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
GENAI_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
GENAI_TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1, 4, 16, ... 67108864
GENAI_LABELS = ("gen_ai_operation_name", "gen_ai_response_model")


class LLMMetrics:
    def __init__(self, registry: CollectorRegistry, stats: Callable[[], dict[str, Any]],
                 model: Callable[[], str] = lambda: ""):
        r = registry
        self._model = model
        self._genai_children: dict[bool, tuple[Any, Any, Any, Any, Any]] = {}
        self.genai_ttft = Histogram("gen_ai_server_time_to_first_token_seconds", "GenAI semconv: time to generate "
                                    "the first token.", GENAI_LABELS, buckets=GENAI_TTFT_BUCKETS, registry=r)
        self.genai_tpot = Histogram("gen_ai_server_time_per_output_token_seconds", "GenAI semconv: time per output "
                                    "token after the first, per request.", GENAI_LABELS,
                                    buckets=GENAI_TPOT_BUCKETS, registry=r)
        self.genai_duration = Histogram("gen_ai_server_request_duration_seconds", "GenAI semconv: generation "
                                        "request duration.", GENAI_LABELS, buckets=GENAI_DURATION_BUCKETS, registry=r)
        self.genai_tokens = Histogram("gen_ai_client_token_usage", "GenAI semconv: input and output tokens per "
                                      "request (as its client counts them).", [*GENAI_LABELS, "gen_ai_token_type"],
                                      buckets=GENAI_TOKEN_BUCKETS, registry=r)
        self.ttft = Histogram("ballast_llm_time_to_first_token_seconds", "Time to first token.",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.itl = Histogram("ballast_llm_inter_token_latency_seconds", "Time between output tokens.",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("ballast_llm_e2e_request_latency_seconds", "Whole request latency.",
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("ballast_llm_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.cached_tokens = Counter("ballast_llm_cached_prompt_tokens", "Prompt tokens served from the prefix cache.",
                                     registry=r)
        self.generation_tokens = Counter("ballast_llm_generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter("ballast_llm_requests_finished", "Finished requests by reason.", ["reason"], registry=r)
        for name, key, doc in (
            ("ballast_llm_requests_running", "running", "Sequences in the running batch."),
            ("ballast_llm_requests_waiting", "waiting", "Sequences waiting to be scheduled."),
            ("ballast_llm_kv_cache_usage", "kv_cache_usage", "Fraction of KV cache blocks in use."),
            ("ballast_llm_prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
            ("ballast_llm_prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the cache."),
            ("ballast_llm_preemptions", "num_preemptions", "Sequences preempted (recomputed later) so far."),
            ("ballast_llm_spec_proposed_tokens", "spec_proposed_tokens", "Speculative draft tokens proposed."),
            ("ballast_llm_spec_accepted_tokens", "spec_accepted_tokens", "Speculative draft tokens accepted."),
            ("ballast_llm_spec_acceptance_rate", "spec_acceptance_rate", "Accepted / proposed draft tokens."),
            ("ballast_llm_spec_tokens_per_step", "spec_tokens_per_step",
             "Tokens emitted per speculative step of a sequence."),
            ("ballast_llm_spec_skipped_steps", "spec_skipped_steps", "Decode steps run without speculation "
             "because measured step costs said it would not pay."),
        ):
            Gauge(name, doc, registry=r).set_function(functools.partial(_stat, stats, key))

        def hit_rate() -> float:
            s = stats()
            q = s.get("prefix_cache_queries", 0)
            return float(s.get("prefix_cache_hits", 0)) / q if q else 0.0

        Gauge("ballast_llm_prefix_cache_hit_rate", "Prefix cache hits / queries (tokens).", registry=r).set_function(
            hit_rate
        )

    def _genai(self, chat: bool) -> tuple[Any, Any, Any, Any, Any]:
        """The GenAI label children of one operation (looked up once: `labels()` costs more than observing)."""
        children = self._genai_children.get(chat)
        if children is None:
            labels = ("chat" if chat else "text_completion", self._model())
            children = self._genai_children[chat] = (
                self.genai_ttft.labels(*labels), self.genai_tpot.labels(*labels), self.genai_duration.labels(*labels),
                self.genai_tokens.labels(*labels, "input"), self.genai_tokens.labels(*labels, "output"))
        return children

    def observe_first_token(self, seconds: float, chat: bool) -> None:
        self.ttft.observe(seconds)
        self._genai(chat)[0].observe(seconds)

    def observe_finished(self, out: Any, seconds: float, output_tokens: int = 0, per_token_s: float | None = None,
                         chat: bool = True) -> None:
        """A request finished: its latency, prompt and cached tokens, each choice's finish reason, and the GenAI
        per-request histograms (time per output token only when it had two tokens or more)."""
        _, tpot, duration, tokens_in, tokens_out = self._genai(chat)
        duration.observe(seconds)
        tokens_in.observe(len(out.prompt_token_ids))
        tokens_out.observe(output_tokens)
        if per_token_s is not None:
            tpot.observe(per_token_s)
        self.e2e.observe(seconds)
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.cached_tokens.inc(out.num_cached_tokens or 0)
        for c in out.outputs:
            self.finished.labels(c.finish_reason or "unknown").inc()


def _stat(stats: Callable[[], dict[str, Any]], key: str) -> float:
    return float(stats().get(key, 0))
