"""A small chain: split a text into words, embed each word (fan-out), and sum the vectors."""

from __future__ import annotations

from pydantic import BaseModel

from ballast.chains import Chainlet, ChainletConfig, depends, entrypoint


class Vector(BaseModel):
    values: list[float]


class Embed(Chainlet):
    """A stand-in embedding: letter counts of a few vowels."""

    config = ChainletConfig(idempotent=True)

    async def run(self, word: str) -> Vector:
        return Vector(values=[float(word.count(c)) for c in "aeiou"])


class Split(Chainlet):
    def run(self, text: str) -> list[str]:
        return text.split()


@entrypoint
class Pipeline(Chainlet):
    def __init__(self, split=depends(Split), embed=depends(Embed, retries=2, timeout_s=30)):
        self.split = split
        self.embed = embed

    async def run(self, text: str) -> Vector:
        words = await self.split.run(text)
        vectors = await self.embed.map(words, concurrency=8)
        return Vector(values=[sum(v.values[i] for v in vectors) for i in range(5)])
