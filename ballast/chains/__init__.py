"""Chains: several steps (`Chainlet`s) calling each other, run in one process or deployed one per step."""

from ballast.chains.chainlet import Chainlet, ChainletConfig, depends, entrypoint
from ballast.chains.errors import ChainDefinitionError, ChainError
from ballast.chains.handle import StepHandle
from ballast.chains.local import LocalChain, find_entry, load_module, run_chain

__all__ = ["ChainDefinitionError", "ChainError", "Chainlet", "ChainletConfig", "LocalChain", "StepHandle",
           "depends", "entrypoint", "find_entry", "load_module", "run_chain"]
