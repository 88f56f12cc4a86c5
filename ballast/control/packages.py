"""Content-addressed package copies: `$BALLAST_HOME/packages/<sha256>`, written once, never changed."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ballast.package import Package


def store_package(package: Package, packages_dir: Path) -> Path:
    """Copy the package's files to `packages_dir/<fingerprint>` (atomically; a no-op when already there)."""
    packages_dir.mkdir(parents=True, exist_ok=True)
    final = packages_dir / package.fingerprint
    if final.is_dir():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=packages_dir))
    try:
        for src in package.files():
            dst = tmp / src.relative_to(package.path)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # a concurrent deploy of the same package won the race: fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def source_signature(root: Path, ignored: frozenset[str]) -> tuple[tuple[str, int, int], ...]:
    """Cheap change detector for `ballast dev`: (path, size, mtime) of every package file."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ignored)
        for name in sorted(filenames):
            if name in ignored or name.endswith(".pyc"):
                continue
            p = os.path.join(dirpath, name)
            try:
                st = os.stat(p)
            except OSError:
                continue
            out.append((os.path.relpath(p, root), st.st_size, st.st_mtime_ns))
    return tuple(out)


def pin_pools(config: dict[str, Any], fingerprint: str, pools: list[str] | None) -> tuple[dict[str, Any], str]:
    """(config, version fingerprint) of a deploy pinned to `pools` (`ballast deploy --pool`): the pins replace
    `placement.pools` of ballast.yaml and are part of the version, so the same package pinned elsewhere is another
    version rather than a changed one."""
    if not pools:
        return config, fingerprint
    config = {**config, "placement": {**(config.get("placement") or {}), "pools": list(pools)}}
    pinned = hashlib.sha256(f"{fingerprint}\0pools={','.join(pools)}".encode()).hexdigest()
    return config, pinned[: len(fingerprint)]
