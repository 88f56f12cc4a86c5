"""Running a whole chain in one process: build every step once, call the entry step through a handle."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

from ballast.chains.chainlet import Chainlet, Dependency, contract_of, dependencies_of
from ballast.chains.context import deadline_var, request_id_var
from ballast.chains.errors import ChainDefinitionError
from ballast.chains.handle import StepHandle


def load_module(path: str | Path) -> ModuleType:
    """Import the user's pipeline file under a stable name (so its classes pickle and print well)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ChainDefinitionError(f"no such file: {path}")
    name = f"ballast_chain_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ChainDefinitionError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def find_entry(module: ModuleType) -> type[Chainlet]:
    """The one step of the module marked as the entry (`@entrypoint` or `entry = True`)."""
    steps = [v for v in vars(module).values()
             if isinstance(v, type) and issubclass(v, Chainlet) and v is not Chainlet and v.entry]
    if len(steps) != 1:
        found = ", ".join(s.__name__ for s in steps) or "none"
        raise ChainDefinitionError(f"{module.__name__}: mark exactly one step with @entrypoint (found {found})")
    return steps[0]


def chain_steps(entry: type[Chainlet]) -> list[type[Chainlet]]:
    """Every step the entry reaches, dependencies first; a cycle or an unsafe retry is refused here."""
    order: list[type[Chainlet]] = []
    visiting: set[type[Chainlet]] = set()

    def visit(cls: type[Chainlet]) -> None:
        if cls in order:
            return
        if cls in visiting:
            raise ChainDefinitionError(f"dependency cycle through step {cls.__name__}")
        visiting.add(cls)
        contract_of(cls)
        for dep in dependencies_of(cls).values():
            _check_retries(cls, dep)
            visit(dep.target)
        visiting.discard(cls)
        order.append(cls)

    visit(entry)
    return order


def _check_retries(caller: type[Chainlet], dep: Dependency) -> None:
    if dep.retries and not dep.target.config.idempotent:
        raise ChainDefinitionError(
            f"step {caller.__name__} asks for retries of {dep.target.__name__}, which is not idempotent: set "
            f"config = ChainletConfig(idempotent=True) on {dep.target.__name__} if running it twice is harmless")


class LocalChain:
    """A chain built in this process: one instance per step, dependencies wired as `StepHandle`s."""

    def __init__(self, entry: type[Chainlet]) -> None:
        self.entry = entry
        self.instances: dict[type[Chainlet], Chainlet] = {}
        for cls in chain_steps(entry):
            deps = {name: StepHandle(self.instances[d.target], contract_of(d.target), d)
                    for name, d in dependencies_of(cls).items()}
            self.instances[cls] = cls(**deps)
        self.handle = StepHandle(self.instances[entry], contract_of(entry), Dependency(entry))

    @property
    def streams(self) -> bool:
        return contract_of(self.entry).kind == "stream"

    def _scope(self, request_id: str | None, deadline_s: float | None) -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        rid = request_id_var.set(request_id or uuid.uuid4().hex)
        dl = deadline_var.set(None if deadline_s is None else loop.time() + deadline_s)
        return rid, dl

    async def call(self, inputs: dict[str, Any], *, request_id: str | None = None,
                   deadline_s: float | None = None) -> Any:
        """Run the chain once (a non-streaming entry) and return the entry's validated result."""
        rid, dl = self._scope(request_id, deadline_s)
        try:
            return await self.handle.run(**inputs)
        finally:
            deadline_var.reset(dl)
            request_id_var.reset(rid)

    async def stream(self, inputs: dict[str, Any], *, request_id: str | None = None,
                     deadline_s: float | None = None) -> AsyncIterator[Any]:
        """Run a streaming entry, yielding its validated items."""
        rid, dl = self._scope(request_id, deadline_s)
        try:
            async for item in self.handle.run(**inputs):
                yield item
        finally:
            deadline_var.reset(dl)
            request_id_var.reset(rid)


async def run_chain(entry: type[Chainlet], inputs: dict[str, Any], *, request_id: str | None = None,
                    deadline_s: float | None = None) -> Any:
    """Build the chain of `entry` and run it once; a streaming entry's items come back as a list."""
    chain = LocalChain(entry)
    if chain.streams:
        return [x async for x in chain.stream(inputs, request_id=request_id, deadline_s=deadline_s)]
    return await chain.call(inputs, request_id=request_id, deadline_s=deadline_s)
