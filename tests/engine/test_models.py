"""The Llama family variants (Qwen2 attention bias and tied embeddings, Qwen3 q/k norm, Mistral, Llama 3
and linear RoPE scaling) give the same greedy tokens as HF transformers on tiny random checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ballast.engine import LLM, SamplingParams
from tests.engine.conftest import assert_no_leaks, hf_greedy

transformers = pytest.importorskip("transformers")

COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5}

VARIANTS = {
    "qwen2_bias_tied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True, "rope_theta": 1e6}),
    "qwen3_qk_norm": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, "tie_word_embeddings": False}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", {
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64}}),
    "linear_rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
}


def _make(kind: str, tiny: Path, out: Path):
    cfg_cls, model_cls, extra = VARIANTS[kind]
    vocab = transformers.AutoConfig.from_pretrained(str(tiny)).vocab_size
    cfg = getattr(transformers, cfg_cls)(vocab_size=vocab, **COMMON, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.5 if "embed" in name else 0.08)
    model.save_pretrained(str(out))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / f, out / f)
    return model


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_variant_greedy_equals_hf(kind, tiny, tmp_path):
    hf = _make(kind, tiny, tmp_path / kind)
    llm = LLM(str(tmp_path / kind), kv_cache_bytes=8 << 20, block_size=8)
    prompts = [[(7 * i + 3 * j) % 400 + 5 for j in range(n)] for i, n in enumerate((5, 90, 33))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs, strict=True):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 12)
    assert_no_leaks(llm)
