"""Training examples as token ids: the chat template rendered as the engine renders it (its own tokenizer and
template code), with labels on the assistant's tokens only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ballast.engine.tokenizer import Tokenizer

IGNORE = -100


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _text(m: dict[str, Any]) -> dict[str, Any]:
    """A message with its content as a string (content parts joined), as templates expect."""
    c = m.get("content")
    if isinstance(c, list):
        c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return {"role": m["role"], "content": c or ""}


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def supervised(tok: Tokenizer, messages: list[dict[str, Any]], max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one conversation: every assistant turn is learned, the rest is context."""
    msgs = [_text(m) for m in messages]
    ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False))
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = _common(tok.encode(tok.apply_chat_template(msgs[:i], add_generation_prompt=True)), ids)
        end = _common(tok.encode(tok.apply_chat_template(msgs[:i + 1], add_generation_prompt=False)), ids)
        labels[start:end] = ids[start:end]
    return ids[:max_length], labels[:max_length]


def preference_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DPO rows in TRL's conversational form: {prompt: [...], chosen: [msg], rejected: [msg]}."""
    return [{"prompt": [_text(m) for m in r["prompt"]], "chosen": [_text(r["chosen"])],
             "rejected": [_text(r["rejected"])]} for r in rows]
