"""Engine errors: the client's fault (`EngineError`, a 400) or the engine's (`EngineInternalError`, a 500).

Kept in a leaf module so every engine module (and the checkpoint tools) can raise them without
importing each other.
"""

from __future__ import annotations


class EngineError(ValueError):
    """A request the engine refuses; `code` is the OpenAI-style error code."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param


class EngineInternalError(RuntimeError):
    """The engine failed while serving a request (a bug, an OOM); the request fails, the engine goes on."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id
