"""The shipped Prometheus recording rules and Grafana dashboard name only metrics that a real platform and a real
LLM replica serve on /metrics (or rules the rules file records), and both files parse."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO
from tests.control.platform import Platform

RULES = REPO / "deploy" / "prometheus" / "recording-rules.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "ballast-dashboard.json"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "summary": ("", "_sum", "_count", "_created"), "info": ("_info",), "unknown": ("",)}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def _served(text: str) -> set[str]:
    """Every series name a /metrics text can hold, from its families (a labelled family with no sample yet
    still declares its name and type)."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names.update(fam.name + s for s in SUFFIXES.get(fam.type, ("",)))
        names.update(s.name for s in fam.samples)
    return names


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects: identifiers outside label matchers, ranges, strings and
    by/without lists, not followed by `(` (functions and aggregations)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\w+|\b\d[\d.]*(?:[eE][+-]?\d+)?", " ", e)  # variables, numbers (1e-9)
    found = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        rest = e[m.end():].lstrip()
        if m.group() not in KEYWORDS and not rest.startswith("("):
            found.add(m.group())
    return found


def test_the_expression_reader_finds_metrics_and_only_them() -> None:
    expr = ('histogram_quantile(0.95, sum by (deployment, le) (rate(foo_bucket{deployment=~"$deployment"}[5m])))'
            ' / clamp_min(sum without (x) (a:b:c), 1e-9) and on (d) bar')
    assert metric_names(expr) == {"foo_bucket", "a:b:c", "bar"}


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}
    rules = []
    for g in doc["groups"]:
        assert g["name"] and g["rules"]
        for r in g["rules"]:
            assert set(r) <= {"record", "expr", "labels"} and r["record"] and r["expr"], r
            assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", r["record"]), r["record"]
            rules.append(r)
    names = [r["record"] for r in rules]
    assert len(names) == len(set(names)), "a recording rule is defined twice"
    return rules


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["panels"]
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for v in dash["templating"]["list"]:  # Grafana's label_values(METRIC, LABEL): its METRIC must exist too
        if isinstance(v.get("query"), dict):
            m = re.fullmatch(r"label_values\((\w+), *\w+\)", v["query"]["query"])
            assert m, v["query"]
            exprs.append(m.group(1))
    assert len(exprs) > 10
    return exprs


def _traffic(plat: Platform) -> None:
    """One whole and one streamed chat (so every labelled gateway and engine series exists)."""
    for stream in (False, True):
        r = httpx.post(plat.url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {plat.key}"},
                       json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                             "ignore_eos": True, "stream": stream})
        assert r.status_code == 200, r.text


def _scrape(plat: Platform) -> set[str]:
    platform = httpx.get(plat.url + "/metrics", headers={"Authorization": f"Bearer {plat.key}"}, timeout=10)
    assert platform.status_code == 200
    replica = httpx.get(plat.show("chat")["replicas"][0]["url"] + "/metrics", timeout=10)
    assert replica.status_code == 200
    served = _served(platform.text) | _served(replica.text)
    assert "gen_ai_server_time_to_first_token_seconds_bucket" in served
    assert "gen_ai_server_time_per_output_token_seconds_bucket" in served
    assert "ballast_gateway_requests_total" in served
    return served


def test_rules_and_dashboard_reference_only_served_metrics(plat: Platform) -> None:
    _traffic(plat)
    served = _scrape(plat)
    rules = _rules()
    recorded = {r["record"] for r in rules}
    for r in rules:
        missing = {n for n in metric_names(r["expr"]) if ":" not in n} - served
        assert not missing, (r["record"], missing)
        assert not {n for n in metric_names(r["expr"]) if ":" in n} - recorded
    used = set()
    for expr in _dashboard_exprs():
        names = metric_names(expr)
        assert names, expr
        unknown = {n for n in names if (n not in recorded if ":" in n else n not in served)}
        assert not unknown, (expr, unknown)
        used |= names
    assert used & recorded and used - recorded  # it shows recorded series and raw ones


def test_genai_histograms_count_the_requests(plat: Platform) -> None:
    """The GenAI-named histograms are observed per request, labelled by operation and model."""
    rep = plat.show("chat")["replicas"][0]["url"]

    def count(name: str) -> float:
        text = httpx.get(rep + "/metrics", timeout=10).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and s.labels.get("gen_ai_operation_name") == "chat")

    before = count("gen_ai_server_request_duration_seconds_count")
    tpot_before = count("gen_ai_server_time_per_output_token_seconds_count")
    _traffic(plat)
    assert count("gen_ai_server_request_duration_seconds_count") == before + 2
    assert count("gen_ai_server_time_per_output_token_seconds_count") == tpot_before + 2
    text = httpx.get(rep + "/metrics", timeout=10).text
    assert re.search(r'gen_ai_client_token_usage_count\{gen_ai_operation_name="chat",gen_ai_response_model="[^"]+",'
                     r'gen_ai_token_type="output"\} [1-9]', text)


def test_files_exist_where_the_readme_says() -> None:
    readme = (REPO / "README.md").read_text()
    for path in (RULES, DASHBOARD):
        assert path.relative_to(REPO).as_posix() in readme
