"""Reading a package directory into a validated, fingerprinted `Package`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ballast.config import CONFIG_FILENAME, BallastConfig, load_config

# Never part of a package's identity: caches and local environments.
IGNORED_NAMES = frozenset({"__pycache__", ".git", ".venv", "venv", ".mypy_cache", ".pytest_cache", ".DS_Store"})


class PackageError(ValueError):
    """The directory is not a usable package (the message says why and what to do)."""


@dataclass(frozen=True)
class Package:
    path: Path
    config: BallastConfig

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    def files(self) -> list[Path]:
        """Every file of the package, sorted, without caches; what a deploy copies."""
        out: list[Path] = []
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path)
            if any(part in IGNORED_NAMES or part.endswith(".pyc") for part in rel.parts):
                continue
            if p.is_file():
                out.append(p)
        return out

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over relative paths and contents: identical packages give identical versions."""
        h = hashlib.sha256()
        for p in self.files():
            rel = p.relative_to(self.path).as_posix().encode()
            h.update(len(rel).to_bytes(4, "big") + rel)
            data = p.read_bytes()
            h.update(len(data).to_bytes(8, "big"))
            h.update(data)
        return h.hexdigest()


def load_package(path: str | Path) -> Package:
    """Load and validate a package; raises `ConfigError` or `PackageError` with a clear message."""
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise PackageError(f"{root}: no such directory")
    if root.is_file() and root.name == CONFIG_FILENAME:
        root = root.parent
    if not root.is_dir():
        raise PackageError(f"{root}: a package is a directory containing {CONFIG_FILENAME}")
    config = load_config(root)
    if config.engine is None:
        module = config.model.module
        if module.endswith(".py") and not (root / module).is_file():
            raise PackageError(
                f"{root / CONFIG_FILENAME}: `model` points at {module}, which is not in the package "
                f"(add {module} defining class {config.model.class_name}, or configure `engine`)"
            )
    return Package(path=root, config=config)
