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


def _job_with_copy(sessions, home, dataset: str, status: str):  # type: ignore[no-untyped-def]
    """A fine-tuning job row on `dataset:NAME` and its train.jsonl, written as FineTunes writes it."""
    from ballast.control.finetune import FineTunes, job_dir
    from ballast.control.finetune_spec import parse_request
    from ballast.store import FineTuneJob

    req = parse_request({"model": "chat", "training_file": f"dataset:{dataset}", "ballast": {"held_out": 0}})
    with sessions() as s:
        rows = FineTunes(sessions, home)._dataset_rows(s, dataset, req)
        s.add(FineTuneJob(id=f"ftjob-{status}", key_id="key-a", model="chat", base_version=1, method="supervised",
                          hyperparameters={}, training_file=f"dataset:{dataset}", status=status, adapter_name="a",
                          step=0, attempts=0, progress_offset=0, cancel_requested=False, pid=None))
        s.commit()
    d = job_dir(home, f"ftjob-{status}")
    d.mkdir(parents=True)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_deleting_data_deletes_the_fine_tuning_jobs_copies(database_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ballast.store import FineTuneJob

    engine, sessions = open_store(database_url)
    ds = Datasets(sessions, tmp_path)
    for i, days in enumerate([1, 30, 30]):
        ds.capture("d", f"req-{i}", "key-a", "chat", [{"role": "user", "content": f"q{i}"}], ANSWER, days)
    ds.feedback("req-2", "key-a", False, None, {"role": "assistant", "content": "better"}, _same)
    done = _job_with_copy(sessions, tmp_path, "d", "succeeded")
    running = _job_with_copy(sessions, tmp_path, "d", "running")
    assert ds.sweep(utcnow() + timedelta(days=2)) == 1  # req-0 expires: its line leaves both copies
    for d in (done, running):
        assert [json.loads(x)["messages"][0]["content"] for x in (d / "train.jsonl").read_text().splitlines()] == \
            ["q1", "q2"]
    assert ds.delete("d", "req-2") == {"name": "d", "deleted": 1}  # a corrected record: its preferred line goes
    assert "q2" not in (done / "train.jsonl").read_text() and "q1" in (done / "train.jsonl").read_text()
    assert ds.delete("d") == {"name": "d", "deleted": 1}
    assert not (done / "train.jsonl").exists() and not (running / "train.jsonl").exists()
    with sessions() as s:
        assert s.get(FineTuneJob, "ftjob-running").status == "cancelled"  # its resume would need the data
        assert s.get(FineTuneJob, "ftjob-succeeded").status == "succeeded"
    engine.dispose()
