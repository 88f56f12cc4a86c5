"""Multi-LoRA on the native engine: outputs equal HF transformers + PEFT, mixed batches equal requests run
alone, the prefix cache never crosses adapters, LRU slots and CPU cache churn, and bad adapters refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ballast.engine import LLM, EngineError, SamplingParams
from ballast.engine.tools.lora import make_lora
from tests.engine.conftest import assert_no_leaks

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPT = list(range(5, 45))


@pytest.fixture(scope="module")
def adapters(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("loras")
    out = {f"a{i}": make_lora(tiny, d / f"a{i}", rank=8, seed=i) for i in range(4)}
    # Rank 64, a subset of targets, and whole replaced LM head and embeddings (modules_to_save).
    out["wide"] = make_lora(tiny, d / "wide", rank=64, seed=9, targets=["q_proj", "v_proj", "down_proj"],
                            modules_to_save=["lm_head", "embed_tokens"])
    return out


@pytest.fixture(scope="module")
def llm(tiny: Path, adapters: dict[str, Path]) -> LLM:
    return LLM(str(tiny), adapters={k: str(v) for k, v in adapters.items()}, max_loras=2, max_cpu_loras=3,
               block_size=4)


def _peft_greedy(tiny: Path, adapter: Path, prompt: list[int], n: int) -> list[int]:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _alone(llm: LLM, prompt: list[int], lora: str | None) -> list[int]:
    return llm.generate([prompt], GREEDY, lora=lora)[0].outputs[0].token_ids


@pytest.mark.parametrize("name", ["a0", "wide"])
def test_greedy_equals_hf_peft(llm: LLM, tiny: Path, adapters: dict[str, Path], name: str) -> None:
    got = _alone(llm, PROMPT, name)
    assert got == _peft_greedy(tiny, adapters[name], PROMPT, 10)
    assert got != _alone(llm, PROMPT, None), "the adapter changed nothing: the test would prove nothing"
    assert_no_leaks(llm)


def test_mixed_batch_equals_each_alone(llm: LLM) -> None:
    names: list[str | None] = [None, "a0", "a1", "wide", None, "a2", "a3", "a0", "wide", "a1"]
    prompts = [PROMPT[i : i + 12 + i] for i in range(len(names))]
    alone = [_alone(llm, p, n) for p, n in zip(prompts, names, strict=True)]
    loads = llm.engine.adapters.loads  # type: ignore[union-attr]
    mixed = llm.generate(prompts, GREEDY, lora=names)
    assert [m.outputs[0].token_ids for m in mixed] == alone
    assert llm.engine.adapters.loads > loads  # type: ignore[union-attr]  # 5 adapters through 2 slots
    assert_no_leaks(llm)


def test_prefix_cache_never_crosses_adapters(llm: LLM) -> None:
    prompt = [7] * 30
    assert llm.generate([prompt], GREEDY)[0].num_cached_tokens == 0
    first = llm.generate([prompt], GREEDY, lora="a1")[0]
    assert first.num_cached_tokens == 0, "an adapter reused KV blocks computed by the base model"
    assert llm.generate([prompt], GREEDY, lora="a2")[0].num_cached_tokens == 0
    again = llm.generate([prompt], GREEDY, lora="a1")[0]
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == first.outputs[0].token_ids


def test_unregister_reregister(llm: LLM, adapters: dict[str, Path]) -> None:
    eng, mgr = llm.engine, llm.engine.adapters
    assert mgr is not None
    before = _alone(llm, PROMPT, "a3")
    eng.add_request("running", PROMPT, GREEDY, lora="a3")
    assert mgr.unregister("a3")
    with pytest.raises(EngineError) as e:
        eng.add_request("late", PROMPT, GREEDY, lora="a3")
    assert e.value.code == "model_not_found"
    outs = []
    while eng.has_work():
        outs += [o for o in eng.step() if o.request_id == "running"]
    assert [t for o in outs for c in o.outputs for t in c.token_ids] == before  # in flight: served to the end
    prompt = [9] * 30
    mgr.register("a3", adapters["a1"])  # the name again, other weights: a new registration
    first = llm.generate([prompt], GREEDY, lora="a3")[0]
    assert first.outputs[0].token_ids == _alone(llm, prompt, "a1")
    mgr.register("a3", adapters["a3"])
    assert llm.generate([prompt], GREEDY, lora="a3")[0].num_cached_tokens == 0
    assert _alone(llm, PROMPT, "a3") == before
    assert_no_leaks(llm)


def _corrupt(src: Path, dst: Path, config: dict | None = None, drop: str | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text()) | (config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    t = {k: v for k, v in load_file(str(src / "adapter_model.safetensors")).items() if drop is None or drop not in k}
    save_file(t, str(dst / "adapter_model.safetensors"))
    return dst


def test_bad_adapters_refused(llm: LLM, tiny: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    mgr = llm.engine.adapters
    assert mgr is not None
    bad = [
        _corrupt(adapters["a0"], tmp_path / "dora", {"use_dora": True}),
        _corrupt(adapters["a0"], tmp_path / "half", drop="layers.1.mlp.up_proj.lora_B"),
        _corrupt(adapters["a0"], tmp_path / "bias", {"bias": "all"}),
        tmp_path / "missing",
    ]
    other = make_tiny_other(tmp_path)
    bad.append(make_lora(other, tmp_path / "other-base", rank=4))
    for path in bad:
        with pytest.raises(EngineError) as e:
            mgr.register("bad", path)
        assert e.value.code == "invalid_adapter", path
    big = LLM(str(tiny), enable_lora=True, max_lora_rank=16)
    with pytest.raises(EngineError, match="rank 64"):
        big.engine.adapters.register("wide", adapters["wide"])  # type: ignore[union-attr]
    assert mgr.get("bad") is None


def make_tiny_other(tmp_path: Path) -> Path:
    from ballast.engine.tools import make_tiny

    return make_tiny(tmp_path / "other", layers=2, hidden=32, vocab_size=512)


def test_lora_off_is_unchanged(tiny: Path, llm: LLM) -> None:
    plain = LLM(str(tiny))
    assert plain.engine.adapters is None
    assert plain.generate([PROMPT], GREEDY)[0].outputs[0].token_ids == _alone(llm, PROMPT, None)
    with pytest.raises(EngineError):
        plain.generate([PROMPT], GREEDY, lora="a0")


def test_make_lora_cli_trained_with_peft(tiny: Path, tmp_path: Path) -> None:
    """`ballast models make-lora --train-steps`: the adapter PEFT itself saved loads and equals PEFT."""
    pytest.importorskip("peft")
    from typer.testing import CliRunner

    from ballast.cli.models import app

    out = tmp_path / "trained"
    result = CliRunner().invoke(app, ["make-lora", str(tiny), str(out), "--rank", "4", "--target", "q_proj",
                                      "--target", "down_proj", "--train-steps", "2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    llm = LLM(str(tiny), adapters={"t": str(out)})
    assert _alone(llm, PROMPT, "t") == _peft_greedy(tiny, out, PROMPT, 10)
    bad = CliRunner().invoke(app, ["make-lora", str(tiny), str(tmp_path / "x"), "--rank", "65"])
    assert bad.exit_code != 0 and not (tmp_path / "x").exists()
