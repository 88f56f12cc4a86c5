"""LLM replicas on the native engine: the names the rest of Ballast imports.

The host is `llm_host.EngineHost`, the OpenAI response shapes are in `llm_format`, the metrics in
`llm_metrics`, and `ballast.yaml` → `EngineArgs` in `engine_args`.
"""

from __future__ import annotations

from ballast.config import BallastConfig
from ballast.config.models import NativeEngineConfig
from ballast.runtime.llm_host import EngineHost
from ballast.runtime.llm_metrics import LLMMetrics

__all__ = ["EngineHost", "LLMMetrics", "engine_default_concurrency"]


def engine_default_concurrency(config: BallastConfig) -> int:
    """An engine batches requests itself: admit many at once unless the package says otherwise."""
    if "predict_concurrency" in config.runtime.model_fields_set:
        return config.runtime.predict_concurrency
    eng = config.engine
    return max(256, 4 * eng.max_num_seqs) if isinstance(eng, NativeEngineConfig) else 256
