"""Writing a chain: `Chainlet` steps with a typed `run`, `depends()` for their dependencies, `@entrypoint`."""

from __future__ import annotations

import inspect
import typing
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model

from ballast.chains.errors import ChainDefinitionError
from ballast.config.models import AutoscalingConfig, ResourcesConfig

C = TypeVar("C", bound=type["Chainlet"])


class ChainletConfig(BaseModel):
    """Per-step settings: the same resources and autoscaling models as `ballast.yaml`."""

    model_config = ConfigDict(extra="forbid")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    idempotent: bool = Field(False, description="Calling it twice is harmless, so failed calls may be retried.")


class Chainlet:
    """One step of a chain. Subclass it, define a typed `run` (sync, async or an async generator)."""

    config: ClassVar[ChainletConfig] = ChainletConfig()
    entry: ClassVar[bool] = False
    _contract: ClassVar[Contract | None] = None


def entrypoint(cls: C) -> C:
    """Mark the step a chain's callers call."""
    cls.entry = True
    return cls


@dataclass(frozen=True)
class Dependency:
    """What `depends()` returns: the default of an `__init__` parameter, replaced by a live handle at build time."""

    target: type[Chainlet]
    retries: int = 0
    timeout_s: float | None = None

    def __getattr__(self, name: str) -> Any:
        raise ChainDefinitionError(
            f"depends({self.target.__name__}) is a placeholder: build chains with ballast.chains.run_chain "
            "or `ballast chains run`, not by instantiating steps yourself")


def depends(target: type[Chainlet], *, retries: int = 0, timeout_s: float | None = None) -> Any:
    """Declare a dependency on another step: `def __init__(self, embed=depends(Embed, retries=2, timeout_s=30))`.

    `retries` re-runs a failed call, only where safe: the step must say `idempotent=True` in its config, and a
    stream is retried only before its first item. `timeout_s` bounds each call on top of the caller's deadline.
    """
    if not (isinstance(target, type) and issubclass(target, Chainlet)):
        raise ChainDefinitionError(f"depends() takes a Chainlet class, not {target!r}")
    if retries < 0 or (timeout_s is not None and timeout_s <= 0):
        raise ChainDefinitionError(f"depends({target.__name__}): retries must be >= 0 and timeout_s > 0")
    return Dependency(target, retries, timeout_s)


@dataclass(frozen=True)
class Contract:
    """A step's `run` signature as validators: the inputs as one pydantic model, the output (or stream item) type."""

    step: str
    inputs: type[BaseModel]
    params: tuple[str, ...]
    output: TypeAdapter[Any]
    kind: str  # "sync", "async" or "stream"
    signature: inspect.Signature


def _stream_item(ret: Any) -> Any:
    origin = typing.get_origin(ret)
    if origin in (AsyncIterator, AsyncGenerator, typing.AsyncIterator, typing.AsyncGenerator):
        return typing.get_args(ret)[0] if typing.get_args(ret) else Any
    return Any if ret is inspect.Signature.empty else ret


def _kind(fn: Callable[..., Any]) -> str:
    if inspect.isasyncgenfunction(fn):
        return "stream"
    return "async" if inspect.iscoroutinefunction(fn) else "sync"


def contract_of(cls: type[Chainlet]) -> Contract:
    """Read (once) the contract of a step's `run`; every parameter and the result must be annotated."""
    cached = cls.__dict__.get("_contract")
    if cached is not None:
        return cached
    fn = getattr(cls, "run", None)
    if fn is None or not callable(fn):
        raise ChainDefinitionError(f"step {cls.__name__} has no run() method")
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:
        raise ChainDefinitionError(f"step {cls.__name__}: cannot resolve run()'s annotations: {e}") from None
    sig = inspect.signature(fn)
    fields: dict[str, Any] = {}
    for name, p in list(sig.parameters.items())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ChainDefinitionError(f"step {cls.__name__}: run() cannot take *args or **kwargs")
        if name not in hints:
            raise ChainDefinitionError(f"step {cls.__name__}: run() parameter '{name}' needs a type annotation")
        fields[name] = (hints[name], ... if p.default is p.empty else p.default)
    if "return" not in hints:
        raise ChainDefinitionError(f"step {cls.__name__}: run() needs a return annotation")
    inputs = create_model(f"{cls.__name__}Inputs", __config__=ConfigDict(extra="forbid"), **fields)
    contract = Contract(cls.__name__, inputs, tuple(fields), TypeAdapter(_stream_item(hints["return"])),
                        _kind(fn), sig)
    cls._contract = contract
    return contract


def dependencies_of(cls: type[Chainlet]) -> dict[str, Dependency]:
    """The `__init__` parameters whose default is `depends(...)`."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items() if isinstance(p.default, Dependency)}
