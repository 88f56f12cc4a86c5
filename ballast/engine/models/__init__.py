"""Model architectures served by the engine."""

from ballast.engine.models.llama import LlamaModel

__all__ = ["LlamaModel"]
