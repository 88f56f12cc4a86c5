"""Pydantic models of every section of `ballast.yaml`.

All models forbid unknown keys: a typo in a config file must be an error, not a silently ignored
setting that surfaces as an outage later.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_ACCEL_RE = re.compile(r"^[A-Za-z0-9_-]+(:[1-9][0-9]*)?$")
_MEM_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(Ki|Mi|Gi|Ti|KB|MB|GB|TB|K|M|G|T)?$")
_MEM_UNITS = {
    None: 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
    "T": 10**12, "TB": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}


def parse_memory(value: str | int) -> int:
    """Turn `"2Gi"`, `"512M"` or a byte count into bytes."""
    if isinstance(value, int):
        return value
    m = _MEM_RE.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a memory size; use a number with a unit such as 512Mi or 2Gi")
    return int(float(m.group(1)) * _MEM_UNITS[m.group(2)])


class ModelRef(_Strict):
    """Where the model class lives: `model.py:Model` by default."""

    module: str = Field("model.py", description="Python file (relative to the package) or dotted module.")
    class_name: str = Field("Model", description="Name of the model class in that module.")

    @classmethod
    def from_string(cls, value: str) -> ModelRef:
        module, _, class_name = value.partition(":")
        return cls(module=module or "model.py", class_name=class_name or "Model")


class ResourcesConfig(_Strict):
    cpu: float = Field(1.0, gt=0, description="CPU cores reserved for one replica.")
    memory: str = Field("2Gi", description="Memory for one replica, such as 512Mi or 4Gi.")
    accelerator: str | None = Field(
        None, description='Accelerator type and count, such as "H100:2" or "L4". None for CPU only.'
    )

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        parse_memory(v)
        return v

    @field_validator("accelerator")
    @classmethod
    def _accel(cls, v: str | None) -> str | None:
        if v is not None and not _ACCEL_RE.match(v):
            raise ValueError(f"{v!r} is not an accelerator spec; use TYPE or TYPE:COUNT such as H100:2")
        return v

    @property
    def memory_bytes(self) -> int:
        return parse_memory(self.memory)

    @property
    def accelerator_count(self) -> int:
        if not self.accelerator:
            return 0
        _, _, n = self.accelerator.partition(":")
        return int(n) if n else 1


class RuntimeConfig(_Strict):
    predict_concurrency: int = Field(1, ge=1, le=10_000, description="Requests run at once by one replica.")
    request_timeout_s: float = Field(600.0, gt=0, description="A request running longer gets 504.")
    max_request_bytes: int = Field(
        16 * 2**20, ge=1, description="Bodies larger than this are refused with 413."
    )
    max_queue: int = Field(
        128, ge=0, description="Requests that may wait for a free slot; beyond this, 429 with Retry-After."
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM, in-flight requests get this long to finish."
    )


class HealthConfig(_Strict):
    startup_timeout_s: float = Field(900.0, gt=0, description="load() must finish within this.")
    liveness_period_s: float = Field(10.0, gt=0, description="How often the platform probes liveness.")
    failure_threshold: int = Field(3, ge=1, description="Consecutive failed probes before a restart.")


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(1, ge=0, description="0 enables scale to zero.")
    max_replicas: int = Field(1, ge=1)
    concurrency_target: float = Field(
        1.0, gt=0, description="In-flight requests one replica is meant to carry."
    )
    target_utilization: float = Field(0.8, gt=0, le=1.0, description="Fraction of the target aimed at.")
    window_s: float = Field(60.0, gt=0, description="Averaging window of the load signal.")
    scale_down_delay_s: float = Field(300.0, ge=0, description="Load must stay low this long to scale down.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is greater than max_replicas ({self.max_replicas})"
            )
        return self


class RoutingConfig(_Strict):
    """How the gateway picks a replica for each request."""

    policy: Literal["auto", "prefix", "least_outstanding"] = Field(
        "auto",
        description="auto: prefix-aware for LLM engines, least outstanding requests otherwise; prefix: requests "
        "sharing a prompt prefix (or an x-ballast-session) go to the replica that has it cached, with bounded "
        "load; least_outstanding: power of two choices.",
    )
    max_queue: int = Field(256, ge=0, description="Requests held while no replica is ready (scale from zero).")
    max_wait_s: float = Field(120.0, gt=0, description="Longest a held request waits for a replica before a 503.")
    migration_limit: int = Field(
        3, ge=0, le=16, description="LLM streams: how many times one stream may move to another replica when "
        "the one serving it dies mid-answer (mid-stream resume); 0 ends such a stream with an SSE error event.")


class PlacementConfig(_Strict):
    """Which capacity pools (`ballast pools list`) this deployment's replicas may run in."""

    pools: list[str] = Field(
        default_factory=list, description="Pin to these pools (in order of preference); empty: any healthy pool.")
    spread: bool | int = Field(
        True, description="Keep this version's replicas in at least this many pools (true: 2), so one pool's loss "
        "never takes every replica; false: no minimum. With `prefer: spread`, true spreads them evenly.")
    prefer: Literal["cheapest", "spread", "ordered"] = Field(
        "cheapest", description="cheapest: fill the cheapest healthy pool (`cost_per_hour`; ties: the default pool, "
        "then the order of `pools`); spread: fewest of this version first; ordered: fill `pools` in order.")

    @field_validator("spread")
    @classmethod
    def _spread(cls, v: bool | int) -> bool | int:
        if not isinstance(v, bool) and v < 0:
            raise ValueError("spread is a number of pools (0 or more) or true/false")
        return v

    @property
    def spread_pools(self) -> int:
        """The fewest pools a version's replicas should sit in (when that many are usable)."""
        return (2 if self.spread else 1) if isinstance(self.spread, bool) else max(self.spread, 1)


class AsyncConfig(_Strict):
    """Async requests (`/async_predict`, `/v1/async/...`, batches): a durable queue in the store."""

    max_queue: int = Field(1000, ge=0, description="Queued async requests of this deployment; beyond it 429.")
    max_concurrency: int = Field(8, ge=1, description="Async requests of this deployment in flight at once.")
    result_ttl_s: float = Field(
        0.0, ge=0, description="Keep outputs this long for GET /async_requests/{id}/result (0: drop after the "
        "webhook is delivered).",
    )


class CaptureConfig(_Strict):
    """Opt-in capture of sampled request/response pairs into a named dataset (off unless this section is set)."""

    dataset: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", description="The dataset the pairs go to.")
    sample_rate: float = Field(1.0, ge=0, le=1, description="The share of successful calls captured "
                               "(chat completions, completions, responses; streamed or not).")
    redact: list[str] = Field(default_factory=list, max_length=64, description="Regular expressions replaced by "
                              "[REDACTED] in every string before anything is written.")
    retention_days: float = Field(30.0, gt=0, description="Captured pairs are deleted this long after capture.")

    @field_validator("redact")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"redact pattern {pattern!r} is not a regular expression: {e}") from None
        return v


class DefaultSampling(_Strict):
    """A package's sampling defaults, in the OpenAI/vLLM request's ranges (unset: the checkpoint's or 1.0)."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10)
    max_tokens: int | None = Field(None, ge=1, description="Bound of max_tokens when a request sets none.")


ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_adapter_name(name: str) -> str:
    """Adapter names are model names: no `@`, `:` or `/`, which select environments and versions."""
    if not ADAPTER_NAME.match(name):
        raise ValueError(f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


class SpeculativeConfig(_Strict):
    """Speculative decoding on the native engine (see README "Speculative decoding")."""

    method: Literal["ngram", "self_draft", "draft_model"] = Field(
        "ngram", description="ngram: prompt lookup; self_draft: the model's first layers; draft_model: a "
        "second checkpoint sharing the tokenizer."
    )
    num_tokens: int = Field(4, ge=1, le=16, description="Tokens proposed per step.")
    ngram_max: int = Field(4, ge=1, le=16, description="ngram: longest suffix looked up.")
    ngram_min: int = Field(1, ge=1, le=16, description="ngram: shortest suffix looked up.")
    draft_layers: int = Field(0, ge=0, description="self_draft: layers of the draft (0: a third of the model's).")
    draft_checkpoint: str | None = Field(None, description="draft_model: checkpoint directory or known name.")
    adaptive: bool = Field(True, description="Turn speculation off per step where measured step costs say so.")


class NativeEngineConfig(_Strict):
    """Ballast's own LLM engine serving a Llama-family checkpoint."""

    kind: Literal["native"] = "native"
    checkpoint: str = Field(
        description="Checkpoint directory (relative to the package or absolute), or a known name such as "
        "smollm2-135m-instruct."
    )
    served_model_name: str | None = Field(None, description="Model name reported by /v1/models.")
    max_model_len: int | None = Field(None, ge=16, description="Context length; defaults to the model's.")
    max_num_seqs: int = Field(64, ge=1, description="Sequences batched in one step.")
    max_num_batched_tokens: int = Field(2048, ge=16, description="Token budget of one engine step.")
    kv_cache_memory: str = Field("1Gi", description="Memory for the paged KV cache.")
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV cache block.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    enable_prefix_caching: bool = True
    device: str = Field("auto", description="auto, cpu, or cuda[:N].")
    num_threads: int | None = Field(
        None, ge=1, description="CPU: torch threads (default one per core). Several replicas on one machine "
        "run better with fewer threads each than cores."
    )

    default_sampling: DefaultSampling | None = Field(
        None, description="Sampling for requests that omit a parameter; overrides the checkpoint's "
        "generation_config.json."
    )
    default_max_tokens: int = Field(
        1024, ge=1, description="max_tokens of a request that sets none (clipped to the context left)."
    )
    stall_timeout_s: float = Field(
        120.0, gt=0, description="No engine step for this long while requests wait: the replica is unhealthy."
    )
    tool_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        "auto", description="How tool calls are written and parsed; auto reads the chat template."
    )
    speculative: SpeculativeConfig | None = Field(None, description="Speculative decoding; off when unset.")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters served beside the base model: {name: PEFT adapter "
        "directory inside the package}. A request selects one with `model: NAME`."
    )
    enable_lora: bool = Field(False, description="Accept LoRA adapters loaded at runtime even with none declared.")
    default_adapter: str | None = Field(
        None, description="One of `adapters`: what a request naming the deployment (not an adapter) is served "
        "with. The adapter gate ships a better adapter this way."
    )
    max_loras: int = Field(4, ge=1, le=256, description="Adapters on the device at once (distinct in one batch).")
    max_cpu_loras: int = Field(32, ge=1, description="Adapters kept read in memory; more may be registered.")
    max_lora_rank: int = Field(64, ge=1, le=64, description="Largest adapter rank accepted.")

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, v: dict[str, str]) -> dict[str, str]:
        for name, path in v.items():
            check_adapter_name(name)
            if PurePosixPath(path).is_absolute() or ".." in PurePosixPath(path).parts:
                raise ValueError(f"adapter {name}: {path!r} must be a path inside the package (relative, no '..')")
        return v

    @model_validator(mode="after")
    def _lora_slots(self) -> NativeEngineConfig:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be at least max_loras")
        if self.default_adapter is not None and self.default_adapter not in self.adapters:
            raise ValueError(f"default_adapter {self.default_adapter!r} is not one of engine.adapters")
        return self

    @field_validator("kv_cache_memory")
    @classmethod
    def _kv(cls, v: str) -> str:
        parse_memory(v)
        return v


class CommandEngineConfig(_Strict):
    """An external engine (vLLM, SGLang, ...) started as a child process and proxied to."""

    kind: Literal["command"] = "command"
    preset: Literal["vllm", "sglang"] | None = Field(None, description="Fill start and paths from a preset.")
    start: str | None = Field(None, description="Command line; {port} and {model} are substituted.")
    model: str | None = Field(None, description="Substituted for {model} in the command line.")
    port: int | None = Field(None, ge=1, le=65535, description="Port the engine listens on; free one if unset.")
    readiness_path: str = "/health"
    liveness_path: str = "/health"
    predict_path: str = "/v1/chat/completions"

    @model_validator(mode="after")
    def _has_start(self) -> CommandEngineConfig:
        if not self.start and not self.preset:
            raise ValueError("a command engine needs `start` (a command line) or a `preset`")
        return self


EngineConfig = Annotated[NativeEngineConfig | CommandEngineConfig, Field(discriminator="kind")]


class BallastConfig(_Strict):
    """The whole `ballast.yaml`."""

    # `async` is a Python keyword: the field is `async_`, read as `async` (and as `async_` from stored configs).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", description="Lowercase, digits, dashes.")
    description: str = ""
    model: ModelRef = Field(default_factory=ModelRef, description='"file.py:Class" or {module, class_name}.')
    requirements: list[str] = Field(default_factory=list, description="pip requirement strings.")
    environment_variables: dict[str, str] = Field(default_factory=dict)
    secrets: list[str] = Field(
        default_factory=list, description="Names of secrets; values come from the environment or a secrets file."
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    async_: AsyncConfig = Field(default_factory=AsyncConfig, alias="async")
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    engine: EngineConfig | None = Field(None, description="Serve an LLM with an engine instead of model.py.")
    capture: CaptureConfig | None = Field(None, description="Opt-in capture of traffic into a dataset.")

    @field_validator("model", mode="before")
    @classmethod
    def _model_string(cls, v: object) -> object:
        return ModelRef.from_string(v).model_dump() if isinstance(v, str) else v

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise ValueError(f"secret name {name!r} must look like an environment variable name")
        return v
