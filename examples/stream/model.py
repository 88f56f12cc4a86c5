"""Stream: an async generator model; Ballast sends each yielded item as one server-sent event."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any


class Model:
    async def predict(self, inputs: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        delay = float(inputs.get("delay", 0.01))
        for i, word in enumerate(str(inputs.get("text", "hello from ballast")).split()):
            await asyncio.sleep(delay)
            yield {"index": i, "token": word}
