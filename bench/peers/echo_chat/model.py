"""Answers a chat completion by echoing the last user message: no work, so a proxy's own cost shows.

`async def`: the replica runs it inline on its event loop (no thread-pool hop), which keeps the backend cheap."""

from typing import Any


class Model:
    async def chat_completions(self, request: dict[str, Any]) -> dict[str, Any]:
        text = next((m.get("content") for m in reversed(request.get("messages") or [])
                     if isinstance(m, dict) and m.get("role") == "user"), "")
        return {
            "id": "chatcmpl-echo", "object": "chat.completion", "created": 0, "model": request.get("model", "echo"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
        }
