"""Loading a user's `Model` class and calling its methods the same way, whatever their kind.

A method may be sync, async, a generator or an async generator. Sync code runs in a thread pool so
it never blocks the event loop; generators (of either kind) become async iterators, which the server
streams.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from ballast.package import Package

log = logging.getLogger("ballast.runtime")

OPENAI_METHODS = {
    "chat_completions": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
    "responses": "/v1/responses",
}


class LoadState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class ModelLoadError(RuntimeError):
    """The model module or class could not be imported or constructed."""


def _load_secrets(names: list[str]) -> dict[str, str | None]:
    """Secret values come from the environment or a secrets file, never from the package."""
    values: dict[str, str | None] = {}
    file_values: dict[str, Any] = {}
    secrets_file = os.environ.get("BALLAST_SECRETS_FILE")
    if secrets_file and Path(secrets_file).is_file():
        import yaml

        file_values = yaml.safe_load(Path(secrets_file).read_text()) or {}
    for name in names:
        value = os.environ.get(name, file_values.get(name))
        if value is None:
            log.warning("secret %s is not set (set the environment variable or BALLAST_SECRETS_FILE)", name)
        values[name] = None if value is None else str(value)
    return values


def _import_class(package: Package) -> type:
    ref = package.config.model
    root = str(package.path)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        if ref.module.endswith(".py"):
            path = package.path / ref.module
            mod_name = f"ballast_user_{package.name.replace('-', '_')}_{path.stem}"
            spec = importlib.util.spec_from_file_location(mod_name, path)
            if spec is None or spec.loader is None:
                raise ModelLoadError(f"cannot import {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(ref.module)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"importing {ref.module} failed: {type(e).__name__}: {e}") from e
    cls = getattr(module, ref.class_name, None)
    if not isinstance(cls, type):
        raise ModelLoadError(f"{ref.module} defines no class {ref.class_name}")
    return cls


class ModelHost:
    """Owns one user model instance: construction, `load()`, health and uniform method calls."""

    def __init__(self, package: Package):
        self.package = package
        # Sync user code runs here: at most predict_concurrency threads, even when a timed-out
        # request's thread is still finishing after its slot was given back.
        self.executor = ThreadPoolExecutor(max_workers=package.config.runtime.predict_concurrency,
                                           thread_name_prefix="ballast-model")
        self.state = LoadState.LOADING
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.instance: Any = None
        self._methods: dict[str, Callable[..., Any]] = {}
        self._kinds: dict[str, str] = {}  # method name -> async | asyncgen | gen | sync, found once at load

    # ---- lifecycle -------------------------------------------------------------------------
    def _construct(self) -> Any:
        cfg = self.package.config
        os.environ.update(cfg.environment_variables)
        cls = _import_class(self.package)
        available = {
            "config": cfg,
            "data_dir": self.package.data_dir,
            "secrets": _load_secrets(cfg.secrets),
        }
        params = inspect.signature(cls).parameters
        accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in available.items() if accepts_kwargs or k in params}
        return cls(**kwargs)

    async def load(self) -> None:
        """Construct the model and run its `load()`; never raises (the state says what happened)."""
        started = time.monotonic()
        try:
            self.instance = await anyio.to_thread.run_sync(self._construct)
            load = getattr(self.instance, "load", None)
            if load is not None:
                if inspect.iscoroutinefunction(load):
                    await load()
                else:
                    await anyio.to_thread.run_sync(load)
            for name in ("predict", "preprocess", "postprocess", "is_healthy", *OPENAI_METHODS):
                fn = getattr(self.instance, name, None)
                if callable(fn):
                    self._methods[name] = fn
                    self._kinds[name] = _kind(fn)
            if "predict" not in self._methods and not any(m in self._methods for m in OPENAI_METHODS):
                raise ModelLoadError(
                    "the model class defines neither predict() nor an OpenAI method "
                    "(chat_completions, completions, embeddings)"
                )
            self.load_seconds = time.monotonic() - started
            self.state = LoadState.READY
            log.info("model %s loaded in %.2fs", self.package.name, self.load_seconds)
        except BaseException as e:  # user code may raise anything, SystemExit included
            if isinstance(e, asyncio.CancelledError):
                raise
            self.state = LoadState.FAILED
            self.error = f"{type(e).__name__}: {e}"
            log.exception("model %s failed to load", self.package.name)

    async def shutdown(self) -> None:
        """Threads still running user code finish on their own; no new work is taken."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    def bind_metrics(self, registry: Any) -> None:
        """A Python model has no metrics of its own beyond the replica's."""

    def extra_routes(self) -> list[Any]:
        return []

    def has(self, name: str) -> bool:
        return name in self._methods

    def cancellable(self, name: str) -> bool:
        """Whether cancelling a call stops work (async code); sync code in a thread runs to the end."""
        return self._kinds.get(name) in ("async", "asyncgen")

    async def healthy(self) -> tuple[bool, str | None]:
        if self.state is not LoadState.READY:
            return False, self.state.value if self.error is None else f"load failed: {self.error}"
        check = self._methods.get("is_healthy")
        if check is None:
            return True, None
        try:
            ok = await self.call("is_healthy")
        except Exception as e:
            return False, f"is_healthy() raised {type(e).__name__}: {e}"
        return (True, None) if ok else (False, "is_healthy() returned false")

    # ---- calls -----------------------------------------------------------------------------
    async def call(self, name: str, *args: Any) -> Any:
        """Call a method; returns a value, or an async iterator when the method streams."""
        fn = self._methods[name]
        kind = self._kinds[name]
        if kind == "sync":
            # In the request's context, so the model's own log lines carry its request id (and trace id).
            ctx = contextvars.copy_context()
            result = await asyncio.get_running_loop().run_in_executor(self.executor, ctx.run, fn, *args)
        elif kind == "async":
            result = await fn(*args)
        elif kind == "asyncgen":
            return fn(*args)
        else:
            return _iterate_in_threads(fn(*args))
        if inspect.isasyncgen(result):
            return result
        if inspect.isgenerator(result):
            return _iterate_in_threads(result)
        return result

    async def predict(self, inputs: Any) -> Any:
        """preprocess → predict → postprocess (postprocess applies to whole results, not streams)."""
        if "preprocess" in self._methods:
            inputs = await self.call("preprocess", inputs)
        result = await self.call("predict", inputs)
        if "postprocess" in self._methods and not isinstance(result, AsyncIterator):
            result = await self.call("postprocess", result)
        return result


def _kind(fn: Callable[..., Any]) -> str:
    if inspect.isasyncgenfunction(fn):
        return "asyncgen"
    if inspect.iscoroutinefunction(fn):
        return "async"
    if inspect.isgeneratorfunction(fn):
        return "gen"
    return "sync"


_SENTINEL = object()


async def _iterate_in_threads(gen: Iterator[Any]) -> AsyncIterator[Any]:
    """Drive a sync generator from worker threads so a slow `next()` never blocks the loop."""
    try:
        while True:
            item = await anyio.to_thread.run_sync(next, gen, _SENTINEL)
            if item is _SENTINEL:
                return
            yield item
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            await anyio.to_thread.run_sync(close)
