"""Checkpoint tools outside the engine core: `make_tiny` (tests) and `import_gguf` (the SmolLM2 demo)."""

from ballast.engine.tools.common import SMOLLM2
from ballast.engine.tools.gguf import import_gguf
from ballast.engine.tools.tiny import make_tiny

__all__ = ["SMOLLM2", "import_gguf", "make_tiny"]
