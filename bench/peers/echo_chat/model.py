"""Answers a chat completion by echoing the last message: no work, so a proxy's own cost shows."""

from typing import Any


class Model:
    async def chat_completions(self, request: dict[str, Any]) -> dict[str, Any]:
        text = request["messages"][-1]["content"]
        return {
            "id": "chatcmpl-echo", "object": "chat.completion", "created": 0, "model": request.get("model", "echo"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
        }
