"""Constrained decoding: grammars (JSON schema, regex, choice, Lark) compiled once, cached, and applied
as one token bitmask over the batch's constrained rows.

llguidance does the work: it builds a token trie from our `tokenizer.json` (no `transformers`, runs on
CPU) and computes masks lazily, so a schema costs milliseconds to compile. Compiling happens in the
caller's thread (the replica host, off the engine's step loop); the engine thread only deep-copies
the cached matcher for each sequence, computes masks and advances matchers as tokens are accepted.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llguidance as llg
import llguidance.torch as llt
import torch

from ballast.engine.errors import EngineError

CACHE_SIZE = 256


@dataclass(frozen=True)
class GuidedSpec:
    """What to constrain to. `kind` is json_schema, regex, choice or lark; `value` its (JSON) text."""

    kind: str
    value: str
    param: str = "response_format"  # the request field a compile error names

    @staticmethod
    def json_schema(schema: dict[str, Any], param: str = "response_format") -> GuidedSpec:
        return GuidedSpec("json_schema", json.dumps(schema), param)  # key order is property order

    @staticmethod
    def choice(options: list[str], param: str = "guided_choice") -> GuidedSpec:
        return GuidedSpec("choice", json.dumps(list(options)), param)


class Grammar:
    """A compiled grammar: a matcher in its start state, copied for every sequence that uses it."""

    def __init__(self, spec: GuidedSpec, template: Any):
        self.spec = spec
        self._template = template

    def matcher(self) -> Any:
        return self._template.deep_copy()


def _grammar_text(spec: GuidedSpec) -> str:
    if spec.kind == "json_schema":
        # Compact JSON: a model must not be able to spend its whole budget on whitespace.
        return str(llg.LLMatcher.grammar_from_json_schema(spec.value, defaults={"whitespace_flexible": False}))
    if spec.kind == "regex":
        return str(llg.LLMatcher.grammar_from_regex(spec.value))
    if spec.kind == "choice":
        options = json.loads(spec.value)
        return str(llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options)))
    if spec.kind == "lark":
        return str(llg.LLMatcher.grammar_from_lark(spec.value))
    raise EngineError(f"unknown grammar kind {spec.kind!r}", "invalid_request", param=spec.param)


class GrammarCompiler:
    """Compiles specs to `Grammar`s for one tokenizer; an LRU cache keyed by the spec. Thread-safe."""

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int, eos_ids: list[int],
                 cache_size: int = CACHE_SIZE):
        self._tokenizer_json = tokenizer_json  # called once, on first use
        self.vocab_size = vocab_size
        self._eos = eos_ids
        self._tok: Any = None
        self._cache: OrderedDict[GuidedSpec, Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_size = cache_size
        self.hits = self.misses = 0

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._tok is None:  # built on first use: replicas that never constrain never pay for it
                self._tok = llg.LLTokenizer(self._tokenizer_json(), n_vocab=self.vocab_size, eos_token=self._eos)
            return self._tok

    def compile(self, spec: GuidedSpec) -> Grammar:
        """The cached grammar, or a new one; a spec the library cannot enforce is an EngineError (a 400)."""
        key = GuidedSpec(spec.kind, spec.value)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return Grammar(spec, hit._template)
        tok = self._tokenizer()
        try:
            text = _grammar_text(spec)
        except ValueError as e:
            raise EngineError(f"`{spec.param}` is not valid: {e}", "invalid_request", param=spec.param) from None
        template = llg.LLMatcher(tok, text, log_level=0)
        if template.is_error():
            raise EngineError(f"`{spec.param}` cannot be enforced: {template.get_error()}", "unsupported_schema",
                              param=spec.param)
        grammar = Grammar(key, template)
        with self._lock:
            self.misses += 1
            self._cache[key] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return Grammar(spec, template)


_executor: Any = None


def apply_masks(logits: torch.Tensor, matchers: list[Any]) -> torch.Tensor:
    """Mask the rows whose matcher is not None to the tokens their grammar allows; other rows untouched.

    One int32 bitmask for the constrained rows, filled in parallel by llguidance, moved to the logits'
    device and unpacked there; returns a new tensor when any row is constrained.
    """
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    global _executor
    if _executor is None:
        _executor = llg.LLExecutor()
    vocab = logits.shape[-1]
    bitmask = llt.allocate_token_bitmask(len(rows), vocab)
    llt.fill_next_token_bitmask_par(_executor, [(matchers[i], j) for j, i in enumerate(rows)], bitmask)
    words = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((words[:, :, None] >> shifts) & 1).view(len(rows), -1)[:, :vocab].bool()
    out = logits.clone()
    idx = torch.tensor(rows, device=logits.device)
    out[idx] = out[idx].masked_fill(~allowed, float("-inf"))
    return out


def accept(matcher: Any, token: int) -> bool:
    """Advance the grammar by the sampled token; True once the grammar is complete (nothing may follow)."""
    if not matcher.consume_token(token) or matcher.is_error():
        raise EngineError(f"constrained decoding failed: {matcher.get_error() or 'token not allowed'}",
                          "grammar_error")
    return bool(matcher.is_stopped())
