"""Tokenizer (HF `tokenizer.json`), chat template (jinja2) and incremental detokenization."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from ballast.engine.errors import EngineError


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, path: Path):
        file = path / "tokenizer.json"
        if not file.exists():
            raise EngineError(f"{path}: no tokenizer.json")
        self.hf = HFTokenizer.from_file(str(file))
        cfg_file = path / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.eos_token_id = self.hf.token_to_id(self.eos_token) if self.eos_token else None
        self.bos_token_id = self.hf.token_to_id(self.bos_token) if self.bos_token else None
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        jinja_file = path / "chat_template.jinja"
        if template is None and jinja_file.exists():
            template = jinja_file.read_text()
        self.chat_template: str | None = template
        self._compiled: jinja2.Template | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """`extra`: more template variables, such as `tools`."""
        if not self.chat_template:
            raise EngineError("this checkpoint has no chat template; use /v1/completions with a prompt")
        if self._compiled is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])

            def raise_exception(message: str) -> None:
                raise EngineError(f"chat template: {message}")

            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
            self._compiled = env.from_string(self.chat_template)
        return self._compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", **extra,
        )


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never emitting a broken UTF-8 character.

    Decodes a small window (from `prefix` to the end) and emits what is new relative to the
    window's already-emitted part; a trailing U+FFFD means a multi-byte character is incomplete,
    so it waits for the next token.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_ids[-6:])
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read])
        full = self.tok.decode(self.ids[self.prefix :])
        if full.endswith("\ufffd") or len(full) <= len(prefix_text):
            return ""
        delta = full[len(prefix_text) :]
        self.prefix, self.read = self.read, len(self.ids)
        return delta
