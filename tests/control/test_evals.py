"""Eval metrics, an example's prompt and reference, the two-target diff, and the canary guard's verdict: pure
functions, checked on known inputs."""

from __future__ import annotations

import pytest

from ballast.control.errors import ControlError
from ballast.control.evals import (
    delta,
    differs,
    mean_scores,
    parse_metric,
    prompt_and_reference,
    score,
)
from ballast.platform.canary_guard import GuardLimits, Stats, verdict


@pytest.mark.parametrize(("metric", "output", "reference", "expected"), [
    ("exact", "Paris", "Paris", 1.0),
    ("exact", "  Paris \n", "Paris", 1.0),  # whitespace is normalised
    ("exact", "paris", "Paris", 0.0),
    ("contains", "The capital is Paris.", "Paris", 1.0),
    ("contains", "The capital is Rome.", "Paris", 0.0),
    ("prefix", "SELECT * FROM t", "SELECT", 1.0),
    ("prefix", "select * FROM t", "SELECT", 0.0),
    ("json_valid", '{"a": [1, 2]}', "", 1.0),
    ("json_valid", '{"a": [1, 2]', "", 0.0),
    ("regex:^SELECT .+ FROM \\w+$", "SELECT a FROM t", "", 1.0),
    ("regex:^SELECT .+ FROM \\w+$", "DELETE FROM t", "", 0.0),
    ("token_f1", "a b c", "a b c", 1.0),
    ("token_f1", "a b", "a b c d", 2 * (1.0 * 0.5) / 1.5),
    ("token_f1", "x y", "a b", 0.0),
])
def test_metrics(metric: str, output: str, reference: str, expected: float) -> None:
    assert parse_metric(metric)(output, reference) == pytest.approx(expected)


@pytest.mark.parametrize("spec", ["nope", "regex:", "regex:(unclosed", "regex:" + "a" * 600, "EXACT"])
def test_bad_metrics_are_400(spec: str) -> None:
    with pytest.raises(ControlError) as e:
        parse_metric(spec)
    assert e.value.status == 400 and e.value.param == "metrics"


def test_prompt_and_reference() -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]
    prompt, ref = prompt_and_reference(msgs)
    assert prompt == msgs[:2] and ref == "4"
    with pytest.raises(ValueError):
        prompt_and_reference(msgs[:2])


def test_scores_mean_delta_and_diff() -> None:
    ms = [parse_metric("exact"), parse_metric("contains")]
    a = [score(ms, "x", "x"), score(ms, "xy", "y"), score(ms, None, "z", "503")]
    b = [score(ms, "x", "x"), score(ms, "y", "y"), score(ms, "z", "z")]
    assert a[2].output is None and a[2].error == "503" and a[2].scores == {"exact": 0.0, "contains": 0.0}
    sa, sb = mean_scores(ms, a), mean_scores(ms, b)
    assert sa == pytest.approx({"exact": 1 / 3, "contains": 2 / 3}) and sb == {"exact": 1.0, "contains": 1.0}
    assert delta(sa, sb) == pytest.approx({"exact": 2 / 3, "contains": 1 / 3})
    assert [differs(x, y) for x, y in zip(a, b, strict=True)] == [False, True, True]
    assert mean_scores(ms, []) == {"exact": 0.0, "contains": 0.0}


def test_canary_verdict() -> None:
    limits = GuardLimits(max_error_rate_delta=0.05, max_latency_ratio=2.0, latency_slack_s=0.01)
    stable = Stats(requests=100, errors=1, latency_sum=10.0, latency_count=100)  # 1%, 100 ms
    assert verdict(stable, Stats(), limits)[0]  # no canary traffic: nothing against it
    ok, why = verdict(stable, Stats(requests=20, errors=1, latency_sum=3.0, latency_count=20), limits)
    assert ok, why  # 5% ≤ 1% + 5%; 150 ms ≤ 2 × 100 + 10
    bad, why = verdict(stable, Stats(requests=20, errors=2, latency_sum=2.0, latency_count=20), limits)
    assert not bad and "error rate" in why  # 10% > 6%
    slow, why = verdict(stable, Stats(requests=20, errors=0, latency_sum=5.0, latency_count=20), limits)
    assert not slow and "latency" in why  # 250 ms > 210 ms
    later = Stats(requests=150, errors=1, latency_sum=20.0, latency_count=150).minus(stable)
    assert (later.requests, later.errors, later.mean_latency) == (50, 0, pytest.approx(0.2))
