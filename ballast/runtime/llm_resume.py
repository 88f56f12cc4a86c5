"""Continuing a partial answer, for the gateway's mid-stream resume (and any client that wants it).

`continue_final_message` (vLLM's extension, with `add_generation_prompt: false`) renders the chat template with the
final assistant message left open, so the model carries on writing it. `ballast_resume: {"token_ids": [...]}` (a
Ballast extension) says which token ids spelled the text being continued: the answer a dead replica had already
streamed. The prompt is then the rendered head's tokens plus exactly those ids, so the engine is in the state the
first replica was in; re-tokenizing the text instead could split it differently and change what comes next.
Usage counts those ids as completion tokens, so the whole answer is metered once.

A replica asked to (`x-ballast-stream-tokens: 1`) reports each streamed chunk's token ids in an SSE comment line
(`: ballast {"ids": [...], "p": 12}`) that the gateway strips: an exact count of what reached the client.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from ballast.openai import APIError, sse_event
from ballast.openai.schemas import MAX_TOKENS_LIMIT, TOKEN_ID_MAX

REPORT_KEY = "_ballast_report"  # a chunk's token report, taken out before the chunk is framed
_SENTINEL = "\u2063ballast-continue\u2063"  # where the open message's content goes in the rendered template
_MAX_HELD = 8  # trailing ids whose text may not have reached the client yet (an incomplete UTF-8 character)


def render_head(render: Callable[[list[dict[str, Any]], bool], str], msgs: list[dict[str, Any]]) -> tuple[str, str]:
    """(head, content): the template rendered with the final assistant message open; `head` ends where its
    content starts. A sentinel marks the spot, so templates that add text after a message (an end-of-turn tag)
    or transform its content are cut in the right place."""
    final = msgs[-1] if msgs else None
    if final is None or final.get("role") != "assistant":
        raise APIError(400, "continue_final_message needs the last message to be the assistant's",
                       param="messages", code="invalid_request")
    rendered = render([*msgs[:-1], {**final, "content": _SENTINEL}], False)
    cut = rendered.rfind(_SENTINEL)
    if cut < 0:
        raise APIError(400, "the chat template drops the final message's content, so it cannot be continued",
                       param="messages", code="invalid_request")
    return rendered[:cut], str(final.get("content") or "")


def resume_ids(extra: dict[str, Any] | None) -> tuple[list[int], int] | None:
    """The `ballast_resume` extension: (token ids already sent, chars at the end of a text prompt they spell)."""
    r = (extra or {}).get("ballast_resume")
    if r is None:
        return None
    ids = r.get("token_ids") if isinstance(r, dict) else None
    if not isinstance(ids, list) or len(ids) > MAX_TOKENS_LIMIT or any(
            isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= TOKEN_ID_MAX for t in ids):
        raise APIError(400, "ballast_resume.token_ids must be a list of token ids", param="ballast_resume")
    chars = r.get("chars", 0)
    if isinstance(chars, bool) or not isinstance(chars, int) or chars < 0:
        raise APIError(400, "ballast_resume.chars must be a count of characters", param="ballast_resume")
    return ids, chars


def prompt_with_ids(tokenizer: Any, head: str, sent: str, ids: list[int] | None) -> tuple[str | list[int], int]:
    """(the prompt, how many of its tokens are answer already sent). Without ids, the text as it stands.

    Trailing ids whose text never reached the client (held back while a character was incomplete) are dropped:
    they are generated again. Ids that do not spell `sent` are refused, never guessed at."""
    if ids is None:
        return head + sent, 0
    head_ids = tokenizer.encode(head) if head else []  # as the engine encodes a text prompt
    ctx = head_ids[-4:]
    base = tokenizer.decode(ctx)
    for kept in range(len(ids), max(-1, len(ids) - _MAX_HELD - 1), -1):
        if tokenizer.decode(ctx + ids[:kept])[len(base):] == sent:
            return head_ids + ids[:kept], kept
    raise APIError(400, "ballast_resume.token_ids do not spell the text being continued", param="ballast_resume",
                   code="invalid_request")


def budget(req: Any, sent: int, kept: int, default_max: int) -> Any:
    """The request with its token budget fixed for a resume: ids the gateway counted as sent but that are
    generated again go back into it; without a limit, the engine's default counts the whole answer."""
    if not sent and not kept:
        return req
    back = sent - kept
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(req, name, None)
        if value is not None:
            return req.model_copy(update={name: value + back}) if back else req
    return req.model_copy(update={"max_tokens": max(1, default_max - kept)})


async def reporting(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Frame each chunk with its token report in an SSE comment line (every chunk has one, so a chunk without
    it tells the gateway the count is not exact)."""
    try:
        async for c in chunks:
            report = c.pop(REPORT_KEY, None) or {"ids": []}
            yield b": ballast " + json.dumps(report, separators=(",", ":")).encode() + b"\n" + sse_event(c)
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
