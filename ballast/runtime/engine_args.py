"""`EngineArgs` from a package's `engine:` section: the bridge between `ballast.yaml` and the engine,
kept in the runtime so the engine never imports `ballast.config`."""

from __future__ import annotations

from pathlib import Path

from ballast.config.models import NativeEngineConfig, parse_memory
from ballast.engine.config import EngineArgs


def engine_args(cfg: NativeEngineConfig, base_dir: str | Path | None = None, *, package_name: str | None = None,
                resolve: bool = True) -> EngineArgs:
    """The engine settings of a package. The served model name is decided here, once: the config's
    `served_model_name`, else the package name. `resolve` finds (and imports, once) the checkpoint."""
    checkpoint = cfg.checkpoint
    if resolve:
        from ballast.engine.checkpoints import resolve_checkpoint

        checkpoint = str(resolve_checkpoint(cfg.checkpoint, base_dir))
    defaults = cfg.default_sampling.model_dump(exclude_none=True) if cfg.default_sampling else {}
    spec = cfg.speculative.model_dump() if cfg.speculative else None
    if spec and spec["draft_checkpoint"] and resolve:
        from ballast.engine.checkpoints import resolve_checkpoint

        spec["draft_checkpoint"] = str(resolve_checkpoint(spec["draft_checkpoint"], base_dir))
    return EngineArgs(
        checkpoint=checkpoint,
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        kv_cache_bytes=parse_memory(cfg.kv_cache_memory),
        block_size=cfg.block_size,
        dtype=cfg.dtype,
        enable_prefix_caching=cfg.enable_prefix_caching,
        device=cfg.device,
        served_model_name=cfg.served_model_name or package_name,
        num_threads=cfg.num_threads,
        default_sampling=defaults,
        default_max_tokens=cfg.default_max_tokens,
        stall_timeout_s=cfg.stall_timeout_s,
        speculative=spec,
    )
