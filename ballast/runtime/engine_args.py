"""`EngineArgs` from a package's `engine:` section: the bridge between `ballast.yaml` and the engine,
kept in the runtime so the engine never imports `ballast.config`."""

from __future__ import annotations

from pathlib import Path

from ballast.config.models import NativeEngineConfig, parse_memory
from ballast.engine.config import EngineArgs


def engine_args(cfg: NativeEngineConfig, base_dir: str | Path | None = None, *, package_name: str | None = None,
                resolve: bool = True, hf_token: str | None = None) -> EngineArgs:
    """The engine settings of a package. The served model name is decided here, once: the config's
    `served_model_name`, else the package name. `resolve` finds (and imports or downloads, once) the
    checkpoint; `hf_token` is the package's HF_TOKEN secret, for `hf:` checkpoints."""
    checkpoint = cfg.checkpoint
    if resolve:
        from ballast.engine.checkpoints import resolve_checkpoint

        checkpoint = str(resolve_checkpoint(cfg.checkpoint, base_dir, token=hf_token))
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
        enable_lora=cfg.enable_lora,
        adapters={name: str(adapter_path(base_dir, p)) for name, p in cfg.adapters.items()},
        max_loras=cfg.max_loras,
        max_cpu_loras=cfg.max_cpu_loras,
        max_lora_rank=cfg.max_lora_rank,
        speculative=spec,
    )


def adapter_path(base_dir: str | Path | None, path: str, *, also: Path | None = None) -> Path:
    """An adapter directory inside the package (or `also`, the model cache); ValueError for any path that
    leaves them, symlinks included: a replica never reads a server path a config or client names."""
    base = Path(base_dir or ".").resolve()
    full = (base / path).resolve()
    roots = [base] + ([also.resolve()] if also is not None else [])
    if not any(full.is_relative_to(r) for r in roots):
        raise ValueError(f"adapter path {path!r} is outside the package" + (" and the model cache" if also else ""))
    return full
