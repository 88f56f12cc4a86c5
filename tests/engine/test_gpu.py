"""The engine on CUDA (skipped without a GPU): greedy tokens equal HF's on the same device in fp32, and
the default bf16 path (SDPA attention) serves a batch without leaking KV blocks."""

from __future__ import annotations

import pytest
import torch

from ballast.engine import LLM, SamplingParams
from tests.engine.conftest import assert_no_leaks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_cuda_fp32_greedy_equals_hf(tiny):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).cuda().eval()
    llm = LLM(str(tiny), device="cuda", dtype="float32", kv_cache_memory="16Mi")
    prompt = list(range(5, 37))
    out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=12, min_new_tokens=12,
                          do_sample=False, pad_token_id=0)
    assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist()
    assert_no_leaks(llm)


def test_cuda_bf16_default_serves_a_batch(tiny):
    llm = LLM(str(tiny), device="cuda", kv_cache_memory="16Mi")
    assert llm.engine.runner.dtype == torch.bfloat16
    prompts = [list(range(3, 3 + n)) for n in (5, 17, 40, 17)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [8] * 4
    assert outs[1].outputs[0].token_ids == outs[3].outputs[0].token_ids  # same prompt, same greedy tokens
    assert_no_leaks(llm)
