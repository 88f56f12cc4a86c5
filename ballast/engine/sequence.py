"""Sampling parameters, sequences and request outputs: the engine's plain data."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from ballast.engine.errors import EngineError
from ballast.openai.priority import MAX_PRIORITY, PRIORITY_INTERACTIVE  # lower first; shared with the wire


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    guided: Any = None  # a compiled `guided.Grammar`: every sequence decodes under its own copy
    priority: int = PRIORITY_INTERACTIVE  # scheduling class, 0..MAX_PRIORITY (ballast.openai.priority)

    def __post_init__(self) -> None:
        if self.top_k == 0:
            self.top_k = -1
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        problem = self._sampling_problem() or self._penalty_problem()
        if problem:
            raise EngineError(problem, "invalid_sampling_params")

    def _sampling_problem(self) -> str | None:
        """The first out-of-range length or sampling setting, as the client's error message."""
        if not 1 <= self.n <= 64:
            return f"n must be between 1 and 64, got {self.n}"
        if self.max_tokens is not None and self.max_tokens < 1:
            return f"max_tokens must be at least 1, got {self.max_tokens}"
        if not 0 <= self.temperature <= 100:
            return f"temperature must be between 0 and 100, got {self.temperature}"
        if not 0 < self.top_p <= 1:
            return f"top_p must be in (0, 1], got {self.top_p}"
        if self.top_k < -1:
            return f"top_k must be -1 (off) or positive, got {self.top_k}"
        if not 0 <= self.min_p <= 1:
            return f"min_p must be in [0, 1], got {self.min_p}"
        return None

    def _penalty_problem(self) -> str | None:
        """The first out-of-range penalty, logprobs or stop setting, as the client's error message."""
        if self.repetition_penalty <= 0:
            return f"repetition_penalty must be positive, got {self.repetition_penalty}"
        if not -2 <= self.frequency_penalty <= 2 or not -2 <= self.presence_penalty <= 2:
            return "frequency_penalty and presence_penalty must be between -2 and 2"
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            return f"logprobs must be between 0 and 20, got {self.logprobs}"
        if any(not s for s in self.stop):
            return "stop strings must not be empty"
        if not 0 <= self.priority <= MAX_PRIORITY:
            return f"priority must be between 0 and {MAX_PRIORITY}, got {self.priority}"
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    token_id: int
    token: str
    logprob: float
    top_logprobs: list[tuple[str, float]]


@dataclass
class CompletionOutput:
    index: int
    text: str  # the delta since the previous output
    token_ids: list[int]  # the delta
    finish_reason: str | None = None
    logprobs: list[Logprob] | None = None


@dataclass
class RequestTimes:
    """When a request went through the engine's phases (time.time_ns(), 0 = never reached): queued, first
    scheduled (prefill starts), first token sampled (prefill done), finished. Recorded in the engine thread; the
    replica turns them into trace spans after the fact, so the engine loop makes no tracing call."""

    queued_ns: int
    scheduled_ns: int = 0
    first_token_ns: int = 0
    finished_ns: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    finished: bool = False
    error: str | None = None
    error_code: str | None = None  # set when the error is the client's fault (a 400), else the engine's (a 500)
    times: RequestTimes | None = None  # on the finished output only
    speculative: dict[str, float] | None = None  # on the last output of a speculated request: its acceptance


class Sequence:
    """One generated continuation; a request with n > 1 has n sequences sharing the prompt."""

    def __init__(self, request_id: str, index: int, prompt_ids: list[int], params: SamplingParams,
                 arrival: float, max_len: int, lora: Any = None):
        self.request_id = request_id
        self.lora = lora  # the adapter's `adapters.LoraRef`, or None for the base model
        # Root of the prefix-cache digest chain: each adapter has its own, so no block is shared across them.
        self.cache_root: bytes | None = lora.cache_root if lora is not None else None
        self.index = index
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.arrival = arrival
        self.priority = params.priority
        self.status = Status.WAITING
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.draft_computed = 0  # leading tokens a draft model's own KV cache holds (drafter.py)
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading full blocks registered in the prefix cache
        self.block_hashes: list[bytes] = []
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache on first admission
        self.admitted = False
        self.scheduled_ns = 0  # first time in a batch (time.time_ns())
        self.first_token_ns = 0  # first token sampled
        self.finish_reason: str | None = None
        self.finish_reported = False
        self.max_len = max_len
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            # Any int seeds: folded into the unsigned 64-bit range torch accepts (the API edge bounds it too).
            self.generator = torch.Generator().manual_seed((params.seed + index) % (1 << 64))
        # Output bookkeeping (owned by the engine).
        self.detok: Any = None
        self.text = ""  # decoded output so far
        self.emitted_chars = 0
        self.emitted_tokens = 0
        self.pending_logprobs: list[Logprob] = []
        self.matcher: Any = params.guided.matcher() if params.guided is not None else None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
