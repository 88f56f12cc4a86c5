"""Engine fixtures: a tiny random Llama made with the same code as `ballast models make-tiny`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ballast.engine import LLM
from ballast.engine.tools import make_tiny


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("engine") / "tiny", layers=2, hidden=64, vocab_size=512)


@pytest.fixture(scope="session")
def hf_model(tiny: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()


def hf_greedy(model, prompt_ids: list[int], n: int, ignore_eos: bool = True) -> list[int]:
    ids = torch.tensor([prompt_ids])
    extra = {"min_new_tokens": n} if ignore_eos else {}
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **extra)
    return out[0, len(prompt_ids) :].tolist()


def assert_no_leaks(llm: LLM) -> None:
    eng = llm.engine
    assert not eng.has_work() and not eng.requests
    assert eng.blocks.num_free == eng.blocks.num_blocks, "KV blocks leaked"
    assert all(r == 0 for r in eng.blocks.ref)
