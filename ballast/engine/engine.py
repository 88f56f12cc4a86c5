"""The engine core: requests in, one scheduled step at a time, outputs out. Single-threaded by design;
`AsyncEngine` drives it from a background thread."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ballast.engine.block_manager import BlockManager
from ballast.engine.checkpoints import resolve_checkpoint
from ballast.engine.config import EngineArgs, EngineError, ModelConfig
from ballast.engine.model_runner import ModelRunner
from ballast.engine.scheduler import Scheduler
from ballast.engine.sequence import (
    CompletionOutput,
    Logprob,
    RequestOutput,
    SamplingParams,
    Sequence,
    Status,
)
from ballast.engine.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("ballast.engine")


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    error: str | None = None
    forks: list[Sequence] = field(default_factory=list)  # n > 1: siblings waiting for the shared prompt

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


class LLMEngine:
    def __init__(self, args: EngineArgs):
        self.args = args
        path = resolve_checkpoint(args.checkpoint)  # a directory, or a known name such as smollm2-135m-instruct
        self.model_config = ModelConfig.load(path)
        self.tokenizer = Tokenizer(path)
        self.runner = ModelRunner(args, self.model_config, path)
        self.device, self.dtype = self.runner.device, self.runner.dtype
        mc = self.model_config
        self.model_name = args.served_model_name or path.name
        eos = set(mc.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos
        bs, num_blocks = args.block_size, self.runner.num_blocks
        want = args.max_model_len or min(mc.max_position_embeddings, 32768)
        self.max_model_len = min(want, num_blocks * bs)
        if args.max_model_len and self.max_model_len < args.max_model_len:
            log.warning("kv cache holds %d tokens; max_model_len lowered from %d", num_blocks * bs, args.max_model_len)
        self.blocks = BlockManager(num_blocks, bs, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, args.max_num_seqs, max(args.max_num_batched_tokens, 1))
        self.requests: dict[str, Request] = {}
        self._forking: dict[str, Request] = {}
        self._arrival = 0
        log.info("engine: %s, %d layers, %d KV blocks of %d tokens, max_model_len %d, %s on %s",
                 mc.model_type, mc.num_layers, num_blocks, bs, self.max_model_len, self.dtype, self.device)

    # ---- requests --------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise EngineError("the prompt is empty", "invalid_prompt")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise EngineError(f"the prompt has token ids outside the vocabulary (0..{vocab - 1})", "invalid_prompt")
        if len(ids) >= self.max_model_len:
            raise EngineError(
                f"the prompt has {len(ids)} tokens; this model's maximum context length is {self.max_model_len}",
                "context_length_exceeded",
            )
        return ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> Request:
        if request_id in self.requests:
            raise EngineError(f"request id {request_id} is already in use", "duplicate_request_id")
        ids = self.encode_prompt(prompt)
        room = self.max_model_len - len(ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise EngineError(
                f"the prompt has {len(ids)} tokens and max_tokens asks for {params.max_tokens} more; the context "
                f"holds {self.max_model_len}", "context_length_exceeded",
            )
        req = Request(request_id, ids, params)
        for i in range(params.n):
            self._arrival += 1
            seq = Sequence(request_id, i, ids, params, self._arrival, self.max_model_len)
            seq.detok = IncrementalDetokenizer(self.tokenizer, ids)
            req.seqs.append(seq)
            if i == 0 or not self.blocks.prefix_caching:
                self.scheduler.add(seq)
            else:  # admitted once the first sequence has computed (and cached) the prompt
                req.forks.append(seq)
        self.requests[request_id] = req
        if req.forks:
            self._forking[request_id] = req
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        outs = []
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.remove(seq)
                seq.status = Status.FINISHED
                seq.finish_reason = "abort"
                outs.append(CompletionOutput(seq.index, "", [], "abort"))
        return RequestOutput(request_id, req.prompt_ids, outs, req.seqs[0].num_cached_tokens, finished=True)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> dict[str, float]:
        b = self.blocks
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_cache_usage": b.usage(),
            "prefix_cache_hits": b.hit_tokens,
            "prefix_cache_queries": b.query_tokens,
            "num_free_blocks": b.num_free,
            "num_total_blocks": b.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
        }

    # ---- one step --------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            stuck = self.scheduler.unschedulable
            if stuck is not None:
                self.scheduler.unschedulable = None
                return self._fail([stuck.request_id], "the request does not fit in the KV cache; raise "
                                  "kv_cache_memory or lower max_model_len")
            return []
        try:
            seqs, tokens, logprobs = self.runner.run(scheduled)
        except Exception as e:  # a bug or OOM must fail these requests, not kill the engine
            log.exception("engine step failed")
            return self._fail({s.seq.request_id for s in scheduled}, f"engine error: {type(e).__name__}: {e}")
        for sch in scheduled:
            sch.seq.num_computed += sch.num_tokens
            self.blocks.register_full_blocks(sch.seq)
        if self._forking:
            self._admit_forks()
        touched: dict[str, Request] = {}
        for i, (seq, tok) in enumerate(zip(seqs, tokens, strict=True)):
            self._append(seq, tok, logprobs[i] if logprobs is not None and seq.params.logprobs is not None else None)
            req = self.requests.get(seq.request_id)
            if req is not None:
                touched[req.request_id] = req
        return [self._output(req) for req in touched.values()]

    def _admit_forks(self) -> None:
        """n > 1: once the first sequence's prompt is in the cache, its siblings start from its full blocks."""
        for rid, req in list(self._forking.items()):
            first = req.seqs[0]
            if req.request_id not in self.requests or (first.finished and first.finish_reason == "abort"):
                del self._forking[rid]
            elif first.finished or first.num_computed >= first.num_prompt_tokens:
                for seq in reversed(req.forks):
                    self.scheduler.waiting.appendleft(seq)
                req.forks = []
                del self._forking[rid]

    def _fail(self, request_ids: Iterable[str], message: str) -> list[RequestOutput]:
        outs = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            self.abort(rid)
            outs.append(RequestOutput(rid, req.prompt_ids, [], finished=True, error=message))
        return outs

    def _append(self, seq: Sequence, token: int, logprobs: torch.Tensor | None) -> None:
        p = seq.params
        seq.token_ids.append(token)
        if logprobs is not None:
            top: list[tuple[str, float]] = []
            if p.logprobs:
                vals, idx = torch.topk(logprobs, p.logprobs)
                top = [(self.tokenizer.decode([int(t)], skip_special_tokens=False), float(v))
                       for v, t in zip(vals.tolist(), idx.tolist(), strict=True)]
            seq.pending_logprobs.append(Logprob(token, self.tokenizer.decode([token], skip_special_tokens=False),
                                                float(logprobs[token]), top))
        stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids)
        if not stop_token:
            seq.text += seq.detok.add(token)
        if stop_token or (p.stop and self._check_stop_strings(seq)):
            self._finish(seq, "stop")
        elif (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or seq.num_tokens >= seq.max_len:
            self._finish(seq, "length")

    def _check_stop_strings(self, seq: Sequence) -> bool:
        p = seq.params
        longest = max(len(s) for s in p.stop)
        start = max(0, seq.emitted_chars - longest)
        best = -1
        hit = ""
        for s in p.stop:
            i = seq.text.find(s, start)
            if i != -1 and (best == -1 or i < best):
                best, hit = i, s
        if best == -1:
            return False
        seq.text = seq.text[: best + (len(hit) if p.include_stop_str_in_output else 0)]
        return True

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.scheduler.remove(seq)

    def _output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            hold = 0
            if not seq.finished and seq.params.stop:
                hold = max(len(s) for s in seq.params.stop) - 1  # a stop string may be forming
            upto = max(seq.emitted_chars, len(seq.text) - hold)
            text = seq.text[seq.emitted_chars : upto]
            new_ids = seq.token_ids[seq.num_prompt_tokens + seq.emitted_tokens :]
            report_finish = seq.finished and not seq.finish_reported
            if not text and not new_ids and not report_finish:
                continue
            seq.emitted_chars = max(upto, seq.emitted_chars)
            seq.emitted_tokens = seq.num_output_tokens
            lps = seq.pending_logprobs if seq.params.logprobs is not None else None
            seq.pending_logprobs = []
            if report_finish:
                seq.finish_reported = True
            outs.append(CompletionOutput(seq.index, text, new_ids, seq.finish_reason if report_finish else None, lps))
        finished = req.finished
        if finished:
            self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, req.prompt_ids, outs, req.seqs[0].num_cached_tokens, finished)
