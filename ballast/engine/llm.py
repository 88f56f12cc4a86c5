"""The offline API: `LLM(checkpoint).generate(prompts, params)` runs everything to completion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ballast.engine.config import EngineArgs
from ballast.engine.engine import LLMEngine
from ballast.engine.sequence import CompletionOutput, RequestOutput, SamplingParams


class LLM:
    def __init__(self, checkpoint: str, **engine_args: Any):
        self.engine = LLMEngine(EngineArgs(checkpoint=str(checkpoint), **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._next = 0

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLM:
        """From `EngineArgs` (e.g. `ballast.runtime.engine_args.engine_args(native_engine_config, package_dir)`)."""
        fields = {k: v for k, v in args.__dict__.items() if k not in ("checkpoint", "kv_cache_memory")}
        return cls(args.checkpoint, **fields)

    def generate(
        self, prompts: Sequence[str | list[int]] | str, params: SamplingParams | list[SamplingParams] | None = None,
        lora: str | list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (on the adapter `lora`, or one per prompt); returns one merged output
        per prompt (full text and token ids)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        loras = lora if isinstance(lora, list) else [lora] * len(prompts)
        ids = []
        for prompt, p, name in zip(prompts, params_list, loras, strict=True):
            rid = f"offline-{self._next}"
            self._next += 1
            self.engine.add_request(rid, prompt, p, lora=name)
            ids.append(rid)
        merged: dict[str, RequestOutput] = {}
        while self.engine.has_work():
            for out in self.engine.step():
                acc = merged.get(out.request_id)
                if acc is None:
                    acc = merged[out.request_id] = RequestOutput(out.request_id, out.prompt_token_ids, [],
                                                                 out.num_cached_tokens)
                for c in out.outputs:
                    while len(acc.outputs) <= c.index:
                        acc.outputs.append(CompletionOutput(len(acc.outputs), "", [], None, []))
                    a = acc.outputs[c.index]
                    a.text += c.text
                    a.token_ids += c.token_ids
                    a.finish_reason = c.finish_reason or a.finish_reason
                    if c.logprobs:
                        a.logprobs = (a.logprobs or []) + c.logprobs
                acc.finished = out.finished
                acc.error = out.error
                acc.speculative = out.speculative or acc.speculative
        return [merged[r] for r in ids]

    def chat(self, messages_list: list[list[dict[str, Any]]], params: SamplingParams | None = None
             ) -> list[RequestOutput]:
        prompts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in messages_list]
        return self.generate(prompts, params)
