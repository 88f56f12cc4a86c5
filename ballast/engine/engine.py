"""The engine core: requests in, one scheduled step at a time, outputs out. Single-threaded by design;
`AsyncEngine` drives it from a background thread.

One request must never take the engine down: a failure that can be traced to a request fails that
request alone; a failed forward pass fails the batch it ran; the engine keeps stepping either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ballast.engine import adapters as lora_adapters
from ballast.engine.adapters import LoraRef
from ballast.engine.block_manager import BlockManager
from ballast.engine.checkpoints import resolve_checkpoint
from ballast.engine.config import EngineArgs, ModelConfig, generation_defaults
from ballast.engine.errors import EngineError
from ballast.engine.guided import GrammarCompiler, accept
from ballast.engine.model_runner import ModelRunner, StepResult
from ballast.engine.scheduler import ScheduledSeq, Scheduler
from ballast.engine.sequence import (
    CompletionOutput,
    Logprob,
    RequestOutput,
    RequestTimes,
    SamplingParams,
    Sequence,
    Status,
)
from ballast.engine.spec_control import make_speculator
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
    queued_ns: int = 0  # time.time_ns() when it was submitted

    def times(self) -> RequestTimes:
        """Its phases, over all its sequences (the earliest schedule and first token)."""
        return RequestTimes(self.queued_ns, min((s.scheduled_ns for s in self.seqs if s.scheduled_ns), default=0),
                            min((s.first_token_ns for s in self.seqs if s.first_token_ns), default=0),
                            time.time_ns())

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
        # What a request that omits a sampling parameter gets: the checkpoint's generation_config.json,
        # overridden by the package's engine.default_sampling. max_tokens is a bound, clipped to the context.
        defaults = {**generation_defaults(path), **args.default_sampling}
        self.default_max_tokens = int(defaults.pop("max_tokens", args.default_max_tokens))
        self.default_sampling: dict[str, Any] = defaults
        self.grammars = GrammarCompiler(self.tokenizer.hf.to_str, mc.vocab_size, sorted(eos))
        self.blocks = BlockManager(num_blocks, bs, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, args.max_num_seqs, max(args.max_num_batched_tokens, 1))
        self.adapters = lora_adapters.enable(
            self.runner.model, mc, self.device, self.dtype, enable_lora=args.enable_lora, adapters=args.adapters,
            max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras, max_rank=args.max_lora_rank)
        self.runner.adapters = self.adapters
        self.scheduler.max_loras = args.max_loras if self.adapters is not None else 0
        self.spec = make_speculator(args.speculative, self.runner, self.blocks)
        self.requests: dict[str, Request] = {}
        self._forking: dict[str, Request] = {}
        self._arrival = 0
        log.info("engine: %s, %d layers, %d KV blocks of %d tokens, max_model_len %d, %s on %s",
                 mc.model_type, mc.num_layers, num_blocks, bs, self.max_model_len, self.dtype, self.device)

    # ---- requests --------------------------------------------------------------------------
    def sampling_params(self, **given: Any) -> SamplingParams:
        """SamplingParams from what a request set (None = omitted), the rest from the engine's defaults."""
        kw = {**self.default_sampling, **{k: v for k, v in given.items() if v is not None}}
        kw.setdefault("max_tokens", None)  # None: the engine's default bound (see _length_limit)
        return SamplingParams(**kw)

    def check_request(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The one place a request is checked against the model: vocabulary and context length."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise EngineError("the prompt is empty", "invalid_prompt", param="prompt")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise EngineError(f"the prompt has token ids outside the vocabulary (0..{vocab - 1})", "invalid_prompt",
                              param="prompt")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise EngineError(f"stop_token_ids must be token ids of this model (0..{vocab - 1})",
                              "invalid_request", param="stop_token_ids")
        limit = self.max_model_len
        if len(ids) >= limit:
            raise EngineError(f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                              "tokens", "context_length_exceeded", param="messages")
        if params.max_tokens is not None and params.max_tokens > limit - len(ids):
            raise EngineError(f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                              f"tokens and max_tokens asks for {params.max_tokens} more", "context_length_exceeded",
                              param="max_tokens")
        return ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    lora: str | LoraRef | None = None, queued_ns: int = 0) -> Request:
        """Queue a request, on the base model or on the adapter `lora` (a registered name); `queued_ns` is when it
        was submitted (AsyncEngine: before the hand-over to this thread)."""
        if request_id in self.requests:
            raise EngineError(f"request id {request_id} is already in use", "duplicate_request_id")
        ref = lora_adapters.resolve(self.adapters, lora)
        ids = self.check_request(prompt, params)
        want = params.max_tokens if params.max_tokens is not None else self.default_max_tokens
        max_len = min(self.max_model_len, len(ids) + want)
        req = Request(request_id, ids, params, queued_ns=queued_ns or time.time_ns())
        for i in range(params.n):
            self._arrival += 1
            seq = Sequence(request_id, i, ids, params, self._arrival, max_len, lora=ref)
            seq.detok = IncrementalDetokenizer(self.tokenizer, ids)
            req.seqs.append(seq)
        for i, seq in enumerate(req.seqs):  # all built first: a failure leaves nothing half-added
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
        self._forking.pop(request_id, None)
        if req is None:
            return None
        if self.spec is not None:
            self.spec.stats.pop_request(request_id)
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
            **(self.spec.stats.as_dict() if self.spec is not None else {}),
        }

    # ---- one step --------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """schedule → run → update → output."""
        batch = self.scheduler.schedule()
        if not batch:
            return self._fail_unschedulable()
        now = time.time_ns()
        for sch in batch:
            if not sch.seq.scheduled_ns:
                sch.seq.scheduled_ns = now
        t0 = time.perf_counter()
        try:
            speculative = self.spec is not None and self.spec.attach(batch)
            result = self.runner.run(batch)
        except Exception as e:  # not attributable to one request: the batch fails, the engine goes on
            log.exception("engine step failed; failing its %d sequences", len(batch))
            return self._fail({s.seq.request_id for s in batch}, e)
        touched, outs = self._update(batch, result)
        if self.spec is not None:
            emitted = len(result.tokens) + sum(len(t) - 1 for t in result.extra.values())
            self.spec.observe(batch, speculative, time.perf_counter() - t0, emitted)
        return outs + self._outputs(touched)

    def fail_all(self, error: BaseException) -> list[RequestOutput]:
        """Fail every request (the step failed where no request can be blamed); the engine starts clean."""
        return self._fail(list(self.requests), error)

    def _fail_unschedulable(self) -> list[RequestOutput]:
        stuck = self.scheduler.unschedulable
        if stuck is None:
            return []
        self.scheduler.unschedulable = None
        err = EngineError("the request does not fit in the KV cache; raise kv_cache_memory or lower max_model_len",
                          "kv_cache_exceeded")
        return self._fail([stuck.request_id], err)

    def _update(self, batch: list[ScheduledSeq], result: StepResult) -> tuple[dict[str, Request],
                                                                                list[RequestOutput]]:
        """Advance the scheduled sequences and append the sampled tokens; a failure fails its request alone."""
        failed: dict[str, BaseException] = dict(result.errors)
        logprobs = result.logprobs
        for sch in batch:
            try:
                sch.seq.num_computed += sch.num_tokens
                self.blocks.register_full_blocks(sch.seq)
            except Exception as e:
                failed.setdefault(sch.seq.request_id, e)
        if self._forking:
            self._admit_forks()
        drafted = {id(s.seq): len(s.draft) for s in batch if s.draft}
        touched: dict[str, Request] = {}
        for i, (seq, tok) in enumerate(zip(result.seqs, result.tokens, strict=True)):
            if seq.request_id in failed:
                continue
            try:
                if i in result.extra:
                    self._append_speculative(seq, result.extra[i], drafted.get(id(seq), 0))
                else:
                    self._append(seq, tok, logprobs[i] if logprobs is not None and seq.params.logprobs is not None
                                 else None)
            except Exception as e:
                failed.setdefault(seq.request_id, e)
                continue
            req = self.requests.get(seq.request_id)
            if req is not None:
                touched[req.request_id] = req
        for rid in failed:
            touched.pop(rid, None)
            log.error("request %s failed in the engine", rid, exc_info=failed[rid])
        return touched, [o for rid, e in failed.items() for o in self._fail([rid], e)]

    def _outputs(self, touched: dict[str, Request]) -> list[RequestOutput]:
        outs = []
        for req in touched.values():
            try:
                outs.append(self._output(req))
            except Exception as e:
                log.exception("request %s failed building its output", req.request_id)
                outs.extend(self._fail([req.request_id], e))
        return outs

    def _admit_forks(self) -> None:
        """n > 1: once the first sequence's prompt is in the cache, its siblings start from its full blocks."""
        for rid, req in list(self._forking.items()):
            first = req.seqs[0]
            if req.request_id not in self.requests or (first.finished and first.finish_reason == "abort"):
                del self._forking[rid]
            elif first.finished or first.num_computed >= first.num_prompt_tokens:
                for seq in req.forks:  # earlier arrivals than anything queued since: first in their class
                    self.scheduler.add(seq)
                req.forks = []
                del self._forking[rid]

    def _fail(self, request_ids: Iterable[str], error: BaseException) -> list[RequestOutput]:
        """End these requests with an error: the client's (EngineError, a 400) or the engine's (a 500)."""
        outs = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            try:
                self.abort(rid)
            except Exception:  # its bookkeeping is broken too; drop it, its blocks are lost to the pool
                log.exception("abort of failed request %s failed", rid)
                self.requests.pop(rid, None)
                self._forking.pop(rid, None)
            if isinstance(error, EngineError):
                outs.append(RequestOutput(rid, req.prompt_ids, [], finished=True, error=str(error),
                                          error_code=error.code))
            else:
                outs.append(RequestOutput(rid, req.prompt_ids, [], finished=True,
                                          error=f"the engine failed on request {rid} ({type(error).__name__})"))
        return outs

    def _append(self, seq: Sequence, token: int, logprobs: torch.Tensor | None) -> None:
        p = seq.params
        seq.token_ids.append(token)
        if not seq.first_token_ns:
            seq.first_token_ns = time.time_ns()
        if logprobs is not None:
            top: list[tuple[str, float]] = []
            if p.logprobs:
                vals, idx = torch.topk(logprobs, p.logprobs)
                top = [(self.tokenizer.decode([int(t)], skip_special_tokens=False), float(v))
                       for v, t in zip(vals.tolist(), idx.tolist(), strict=True)]
            seq.pending_logprobs.append(Logprob(token, self.tokenizer.decode([token], skip_special_tokens=False),
                                                float(logprobs[token]), top))
        stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids)
        grammar_done = seq.matcher is not None and not stop_token and accept(seq.matcher, token)
        if not stop_token:
            seq.text += seq.detok.add(token)
        if stop_token or grammar_done or (p.stop and self._check_stop_strings(seq)):
            self._finish(seq, "stop")
        elif seq.num_tokens >= seq.max_len:  # max_tokens (or its default) and the context
            self._finish(seq, "length")

    def _append_speculative(self, seq: Sequence, tokens: list[int], proposed: int) -> None:
        """A verified speculative step: accepted drafts (their K/V is in the cache) then one new token; stops
        at the first that finishes the sequence. Blocks taken only for rejected drafts go back."""
        emitted = 0
        for j, tok in enumerate(tokens):
            self._append(seq, tok, None)
            emitted += 1
            if seq.finished:
                break
            if j < len(tokens) - 1:
                seq.num_computed += 1
        if self.spec is not None:
            self.spec.stats.record(seq.request_id, proposed, emitted)
        if not seq.finished:
            self.blocks.register_full_blocks(seq)
            self.blocks.trim(seq, seq.num_tokens)

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
        spec = None
        if finished:
            self.requests.pop(req.request_id, None)
            spec = self.spec.stats.pop_request(req.request_id) if self.spec is not None else None
        return RequestOutput(req.request_id, req.prompt_ids, outs, req.seqs[0].num_cached_tokens, finished,
                             times=req.times() if finished else None, speculative=spec)
