"""Ballast's native LLM engine: continuous batching, paged KV cache, prefix caching.

One concept per module, nano-vllm style: `config` (engine args, model config), `sequence` (sampling
params, sequences, outputs), `block_manager` (paged KV cache bookkeeping and prefix caching),
`scheduler` (token-budget continuous batching), `layers` (RMSNorm, RoPE, paged attention),
`models/llama` (the Llama family), `loader` (safetensors), `model_runner` (KV cache tensors, batch
layout, forward, sampling), `sampler`, `guided` (constrained decoding: grammars and batch token masks),
`tokenizer` (chat template, incremental detokenization),
`engine` (the step loop), `llm` (offline API), `async_engine` (streaming API), `errors` and
`checkpoints` (name resolution). `tools` (make-tiny, GGUF import) sits outside the core.
"""

from ballast.engine.async_engine import AsyncEngine
from ballast.engine.checkpoints import SMOLLM2, resolve_checkpoint
from ballast.engine.config import EngineArgs, ModelConfig
from ballast.engine.engine import LLMEngine
from ballast.engine.errors import EngineError, EngineInternalError
from ballast.engine.llm import LLM
from ballast.engine.sequence import CompletionOutput, Logprob, RequestOutput, SamplingParams
from ballast.openai.priority import MAX_PRIORITY, PRIORITY_ASYNC, PRIORITY_BATCH, PRIORITY_INTERACTIVE

__all__ = [
    "LLM",
    "MAX_PRIORITY",
    "PRIORITY_ASYNC",
    "PRIORITY_BATCH",
    "PRIORITY_INTERACTIVE",
    "SMOLLM2",
    "AsyncEngine",
    "CompletionOutput",
    "EngineArgs",
    "EngineError",
    "EngineInternalError",
    "LLMEngine",
    "Logprob",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "resolve_checkpoint",
]
