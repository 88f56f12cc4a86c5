"""The one error a chain's caller sees: which step failed, in which request, and why."""

from __future__ import annotations

from typing import Literal

Kind = Literal["error", "contract", "deadline"]


class ChainError(Exception):
    """A failure inside a chain, reported once by the innermost step that failed.

    Steps' own exceptions are converted at the hop where they occur (`raise ... from None`), so the caller
    gets one flat error naming the step, the request id and the step's message instead of a stack of
    nested tracebacks from every hop in between.
    """

    def __init__(self, step: str, request_id: str, message: str, kind: Kind = "error") -> None:
        self.step = step
        self.request_id = request_id
        self.message = message
        self.kind = kind
        what = {"error": "failed", "contract": "broke its contract", "deadline": "ran out of time"}[kind]
        super().__init__(f"step {step} {what} (request {request_id}): {message}")


class ChainDefinitionError(TypeError):
    """A chain that cannot be built (missing annotations, unsafe retries, no entry step): found before any call."""
