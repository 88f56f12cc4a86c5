"""Fine-tuning requests and training files, checked field by field and line by line (no platform needed)."""

from __future__ import annotations

import json

import pytest

from ballast.control.errors import ControlError
from ballast.control.finetune_spec import parse_request, training_rows


def _param(body: dict, param: str) -> str:
    with pytest.raises(ControlError) as e:
        parse_request({"model": "chat", "training_file": "file-1", **body})
    assert e.value.status == 400 and e.value.param == param, e.value.message
    return e.value.message


def test_defaults_auto_and_the_legacy_field() -> None:
    r = parse_request({"model": "chat", "training_file": "file-1"})
    assert r.method == "supervised" and r.hyperparameters == {"n_epochs": 3, "batch_size": 4,
                                                              "learning_rate_multiplier": 1.0}
    r = parse_request({"model": "chat", "training_file": "f", "hyperparameters": {"n_epochs": 2, "batch_size": "auto"}})
    assert r.hyperparameters["n_epochs"] == 2 and r.hyperparameters["batch_size"] == 4
    r = parse_request({"model": "chat", "training_file": "f", "method": {"type": "dpo", "dpo": {
        "hyperparameters": {"beta": 0.3}}}, "ballast": {"gate": {"dataset": "d"}, "max_steps": 5}})
    assert r.method == "dpo" and r.hyperparameters["beta"] == 0.3 and r.ballast["max_steps"] == 5
    assert r.ballast["gate"] == {"dataset": "d", "metric": "exact", "margin": 0.0, "canary_percent": 10,
                                 "hold_s": 60.0}


def test_each_bad_field_is_named() -> None:
    assert "n_epochs" in _param({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs")
    _param({"hyperparameters": {"n_epochs": True}}, "hyperparameters.n_epochs")
    _param({"hyperparameters": {"beta": 0.1}}, "hyperparameters.beta")  # DPO's, not supervised's
    _param({"method": {"type": "rl"}}, "method.type")
    _param({"method": {"type": "supervised", "supervised": {"hyperparameters": {}}}, "hyperparameters": {}},
           "hyperparameters")
    _param({"suffix": "../x"}, "suffix")
    _param({"seed": -1}, "seed")
    _param({"metadata": {"k": 1}}, "metadata")
    _param({"ballast": {"gate": {"dataset": "d", "canary_percent": 0}}}, "ballast.gate.canary_percent")
    _param({"ballast": {"gate": {"dataset": "d", "margin": 1.5}}}, "ballast.gate.margin")
    _param({"ballast": {"lora": {"targets": ["lm_head"]}}}, "ballast.lora.targets")
    _param({"ballast": {"held_out": 1}}, "ballast.held_out")
    _param({"extra": 1}, "extra")
    with pytest.raises(ControlError) as e:
        parse_request({"training_file": "f"})
    assert e.value.param == "model"


def test_training_files_line_by_line() -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    pref = {"input": {"messages": [{"role": "user", "content": "hi"}]},
            "preferred_output": [{"role": "assistant", "content": "hello"}],
            "non_preferred_output": [{"role": "assistant", "content": "go"}]}
    assert training_rows(json.dumps(chat).encode(), "supervised", "training_file") == [chat]
    rows = training_rows(f"{json.dumps(pref)}\n\n{json.dumps(pref)}\n".encode(), "dpo", "training_file")
    assert rows == [{"prompt": pref["input"]["messages"], "chosen": pref["preferred_output"][0],
                     "rejected": pref["non_preferred_output"][0]}] * 2
    for text, method, where in [(f"{json.dumps(chat)}\nnot json", "supervised", "line 2"),
                                (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "supervised",
                                 "line 1: the last message must be the assistant's"),
                                (json.dumps(chat), "dpo", "line 1"), ("\n\n", "supervised", "no examples")]:
        with pytest.raises(ControlError) as e:
            training_rows(text.encode(), method, "training_file")
        assert e.value.status == 400 and where in e.value.message, e.value.message
