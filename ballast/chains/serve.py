"""The replica side of a deployed chain: one step served as a Ballast `Model` (what the generated model.py uses).

Its dependencies become `RemoteHandle`s to their own deployments through the gateway (URL in
`BALLAST_CHAIN_GATEWAY`, key in `BALLAST_CHAIN_KEY` or the package's `.chain-key` file, written by
`ballast chains deploy`).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import httpx

from ballast.chains.chainlet import Chainlet, Dependency, contract_of, dependencies_of
from ballast.chains.context import deadline_var, request_id_var
from ballast.chains.errors import ChainError
from ballast.chains.handle import StepHandle
from ballast.chains.local import load_module
from ballast.chains.remote import ENVELOPE, RemoteHandle
from ballast.observe import request_id_var as http_request_id_var
from ballast.openai.errors import APIError

KEY_FILE = ".chain-key"


def deployment_name(chain: str, step: str) -> str:
    """`{chain}-{step}` in the platform's name rules: `EmbedText` in chain `demo` is `demo-embed-text`."""
    kebab = "".join(f"-{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(step))
    return f"{chain}-{kebab}"


def _key(package_dir: Path) -> str:
    if env := os.environ.get("BALLAST_CHAIN_KEY"):
        return env
    path = package_dir / KEY_FILE
    return path.read_text().strip() if path.is_file() else ""


class StepModel:
    """Serve one step of a chain file; the generated model.py makes a subclass naming the file and the step."""

    chain_file: str = ""
    step: str = ""
    chain: str = ""

    def __init__(self) -> None:
        here = Path(self.chain_file).resolve().parent
        module = load_module(self.chain_file)
        cls: type[Chainlet] = getattr(module, self.step)
        gateway = os.environ.get("BALLAST_CHAIN_GATEWAY", "http://127.0.0.1:8000")
        self.client = httpx.AsyncClient(timeout=None, trust_env=False)
        deps = {name: RemoteHandle(contract_of(d.target), d, gateway, deployment_name(self.chain, d.target.__name__),
                                   _key(here), self.client)
                for name, d in dependencies_of(cls).items()}
        self.handle = StepHandle(cls(**deps), contract_of(cls), Dependency(cls))

    async def predict(self, inputs: Any) -> Any:
        meta: dict[str, Any] = {}
        if isinstance(inputs, dict) and ENVELOPE in inputs:
            meta, inputs = inputs[ENVELOPE], inputs.get("inputs", {})
        if not isinstance(inputs, dict):
            raise APIError(400, f"step {self.step} takes a JSON object of its run() arguments", code="chain_input")
        rid = request_id_var.set(str(meta.get("request_id") or http_request_id_var.get()))
        deadline = meta.get("deadline_s")
        dl = deadline_var.set(None if deadline is None else asyncio.get_running_loop().time() + float(deadline))
        try:
            value = await self.handle.run(**inputs)
        except ChainError as e:
            raise APIError(500, e.message, code=f"chain_{e.kind}", param=e.step) from None
        finally:
            deadline_var.reset(dl)
            request_id_var.reset(rid)
        return self.handle.contract.output.dump_python(value, mode="json")
