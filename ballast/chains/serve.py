"""The replica side of a deployed chain: one step served as a Ballast `Model` (what the generated model.py uses).

Its dependencies become `RemoteHandle`s to their own deployments through the gateway (URL in
`BALLAST_CHAIN_GATEWAY`), pinned to the versions the chain version was built with, and authenticated with the
chain's internal key, which the platform puts in the replica's environment (`BALLAST_CHAIN_KEY`); the user's
key is never involved. Each call logs one line with the chain's trace id, so every step's log has it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, ClassVar

from ballast.chains.chainlet import Chainlet, Dependency, contract_of, dependencies_of
from ballast.chains.context import deadline_var, request_id_var, trace_id_var
from ballast.chains.errors import ChainError
from ballast.chains.handle import StepHandle
from ballast.chains.local import load_module
from ballast.chains.remote import Client, RemoteHandle
from ballast.observe import request_id_var as http_request_id_var
from ballast.observe.hops import ENVELOPE, new_trace_id
from ballast.openai.errors import APIError

log = logging.getLogger("ballast.chains")
KEY_VAR = "BALLAST_CHAIN_KEY"


def deployment_name(chain: str, step: str) -> str:
    """`{chain}-{step}` in the platform's name rules: `EmbedText` in chain `demo` is `demo-embed-text`."""
    kebab = "".join(f"-{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(step))
    return f"{chain}-{kebab}"


def _status(e: ChainError, step: str) -> int:
    """504 for a deadline, 400 for the caller's own inputs breaking this step's contract, else 500."""
    if e.kind == "deadline":
        return 504
    if e.kind == "contract" and e.step == step and e.message.startswith("input"):
        return 400
    return 500


class StepModel:
    """Serve one step of a chain file; the generated model.py makes a subclass naming the file and the step."""

    chain_file: str = ""
    step: str = ""
    chain: str = ""
    versions: ClassVar[dict[str, int]] = {}  # the version of each step this one calls, by class name

    def __init__(self) -> None:
        module = load_module(self.chain_file)
        cls: type[Chainlet] = getattr(module, self.step)
        gateway = os.environ.get("BALLAST_CHAIN_GATEWAY", "http://127.0.0.1:8000")
        key = os.environ.get(KEY_VAR, "")
        deps = dependencies_of(cls)
        if deps and not key:
            log.warning("step %s of chain %s has no %s: calls to other steps will be refused", self.step,
                        self.chain, KEY_VAR)
        self.client = Client()
        handles = {name: RemoteHandle(contract_of(d.target), d, gateway, deployment_name(self.chain, d.target.__name__),
                                      key, self.client, self.versions.get(d.target.__name__), self.chain)
                   for name, d in deps.items()}
        self.handle = StepHandle(cls(**handles), contract_of(cls), Dependency(cls))

    async def predict(self, inputs: Any) -> Any:
        meta: dict[str, Any] = {}
        if isinstance(inputs, dict) and ENVELOPE in inputs:
            meta, inputs = inputs[ENVELOPE] or {}, inputs.get("inputs", {})
        if not isinstance(inputs, dict):
            raise APIError(400, f"step {self.step} takes a JSON object of its run() arguments", code="chain_input")
        rid = request_id_var.set(str(meta.get("request_id") or http_request_id_var.get()))
        trace = trace_id_var.set(str(meta.get("trace_id") or new_trace_id()))
        deadline = meta.get("deadline_s")
        dl = deadline_var.set(None if deadline is None else asyncio.get_running_loop().time() + float(deadline))
        log.info("chain %s step %s started (trace %s)", self.chain, self.step, trace_id_var.get())
        try:
            value = await self.handle.run(**inputs)
        except ChainError as e:
            log.info("chain %s step %s failed (trace %s): %s", self.chain, self.step, trace_id_var.get(), e)
            raise APIError(_status(e, self.step), e.message, code=f"chain_{e.kind}", param=e.step) from None
        except asyncio.CancelledError:
            log.info("chain %s step %s cancelled (trace %s)", self.chain, self.step, trace_id_var.get())
            raise
        finally:
            deadline_var.reset(dl)
            trace_id_var.reset(trace)
            request_id_var.reset(rid)
        return self.handle.contract.output.dump_python(value, mode="json")
