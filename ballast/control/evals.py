"""Evals, the pure part: metrics, an example's prompt and reference, scores and the two-target diff.

A metric compares one model output with one reference and scores it in [0, 1]; a run's score per metric is the
mean over its examples. Nothing here does I/O: the runner (`platform/evals.py`) calls the gateway, and the
store side (`control/eval_store.py`) reads examples and keeps results as `eval` events.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ballast.control.errors import ControlError

METRICS = ("exact", "contains", "prefix", "json_valid", "token_f1", "regex:PATTERN")
MAX_PATTERN = 500


def _norm(text: str) -> str:
    return " ".join(text.split())


def _exact(out: str, ref: str) -> float:
    return float(_norm(out) == _norm(ref))


def _contains(out: str, ref: str) -> float:
    return float(_norm(ref) in _norm(out))


def _prefix(out: str, ref: str) -> float:
    return float(_norm(out).startswith(_norm(ref)))


def _json_valid(out: str, _ref: str) -> float:
    try:
        json.loads(out)
    except ValueError:
        return 0.0
    return 1.0


def _token_f1(out: str, ref: str) -> float:
    """SQuAD-style token overlap F1 (whitespace tokens, multiset)."""
    a, b = out.split(), ref.split()
    if not a or not b:
        return float(a == b)
    left = list(b)
    common = 0
    for t in a:
        if t in left:
            left.remove(t)
            common += 1
    if not common:
        return 0.0
    p, r = common / len(a), common / len(b)
    return 2 * p * r / (p + r)


_SIMPLE: dict[str, Callable[[str, str], float]] = {
    "exact": _exact, "contains": _contains, "prefix": _prefix, "json_valid": _json_valid, "token_f1": _token_f1,
}


@dataclass(frozen=True)
class Metric:
    name: str  # as the user spelled it: `exact`, `regex:^SELECT`
    fn: Callable[[str, str], float]

    def __call__(self, output: str, reference: str) -> float:
        return self.fn(output, reference)


def parse_metric(spec: str) -> Metric:
    """A metric from its name, or ControlError(400) naming the known ones."""
    if spec in _SIMPLE:
        return Metric(spec, _SIMPLE[spec])
    if spec.startswith("regex:"):
        pattern = spec[len("regex:"):]
        if not pattern or len(pattern) > MAX_PATTERN:
            raise ControlError(400, f"regex: needs a pattern of 1..{MAX_PATTERN} characters", "invalid_metric",
                               "metrics")
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ControlError(400, f"regex {pattern!r} does not compile: {e}", "invalid_metric", "metrics") from None
        return Metric(spec, lambda out, _ref: float(rx.search(out) is not None))
    raise ControlError(400, f"unknown metric {spec!r}; known: {', '.join(METRICS)}", "invalid_metric", "metrics")


def _text(content: Any) -> str:
    """A message's text (content parts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def prompt_and_reference(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The conversation minus its final assistant turn, and that turn's text (the reference)."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("an eval example ends with the assistant's answer")
    return list(messages[:-1]), _text(messages[-1].get("content"))


@dataclass
class Scored:
    """One example's outcome on one target: the output (never stored) and a score per metric."""

    output: str | None  # None: the request failed
    scores: dict[str, float]
    error: str | None = None


def score(metrics: list[Metric], output: str | None, reference: str, error: str | None = None) -> Scored:
    if output is None:
        return Scored(None, {m.name: 0.0 for m in metrics}, error or "no output")
    return Scored(output, {m.name: m(output, reference) for m in metrics})


def mean_scores(metrics: list[Metric], results: list[Scored]) -> dict[str, float]:
    n = len(results)
    return {m.name: (sum(r.scores[m.name] for r in results) / n if n else 0.0) for m in metrics}


def differs(a: Scored, b: Scored) -> bool:
    """Two targets disagree on an example: different outputs or different scores."""
    return a.output != b.output or a.scores != b.scores


def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """b − a per metric (the second target against the first)."""
    return {k: b[k] - a[k] for k in a if k in b}
