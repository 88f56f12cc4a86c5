"""Datasets in the store (SQLite, and PostgreSQL when it is up): the retention sweep, one capture per request id,
imports validated line by line with nothing half-written, corrections preferred on export."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from ballast.control.datasets import Datasets, parse_jsonl
from ballast.control.errors import ControlError
from ballast.store import open_store, utcnow

MSGS = [{"role": "user", "content": "q"}]
ANSWER = {"role": "assistant", "content": "a"}


def _same(_deployment: str | None):  # type: ignore[no-untyped-def]
    return lambda v: v


def test_retention_sweep_and_feedback(database_url: str) -> None:
    engine, sessions = open_store(database_url)
    ds = Datasets(sessions)
    ds.capture("d", "req-old", "key-a", "chat", MSGS, ANSWER, retention_days=1)
    ds.capture("d", "req-new", "key-a", "chat", MSGS, ANSWER, retention_days=30)
    ds.capture("d", "req-new", "key-a", "chat", MSGS, {"role": "assistant", "content": "again"}, 30)  # kept once
    assert ds.show("d")["examples"] == 2
    ds.feedback("req-new", "key-a", False, 1, {"role": "assistant", "content": "better"}, _same)
    with pytest.raises(ControlError) as e:
        ds.feedback("req-new", "key-b", False, 1, None, _same)
    assert e.value.status == 404
    assert ds.sweep(utcnow() + timedelta(days=2)) == 1
    assert ds.export("d")["train"] == [{"messages": [*MSGS, {"role": "assistant", "content": "better"}]}]
    assert ds.sweep(utcnow() + timedelta(days=31)) == 1
    assert ds.summary() == []
    engine.dispose()


@pytest.mark.parametrize(("text", "line", "why"), [
    (json.dumps({"messages": [*MSGS, ANSWER]}) + "\nnot json", 2, "Expecting"),
    ('\n{"messages": []}', 2, "non-empty"),
    ('{"messages": [{"role": "robot", "content": "q"}]}', 1, "role"),
    ('{"messages": [{"role": "assistant"}]}', 1, "content"),
    ('{"messages": [{"role": "user", "content": "q"}]}', 1, "last message"),
])
def test_import_errors_name_the_line(text: str, line: int, why: str) -> None:
    with pytest.raises(ControlError) as e:
        parse_jsonl(text)
    assert e.value.status == 400 and e.value.message.startswith(f"line {line}:") and why in e.value.message


def test_import_reads_the_openai_format() -> None:
    line = {"messages": [{"role": "system", "content": "s"}, *MSGS, ANSWER]}
    assert parse_jsonl(json.dumps(line) + "\n\n" + json.dumps(line)) == [line["messages"]] * 2
