"""Packing a package directory for a remote deploy: a gzipped tar of its files, and the tar's sha256.

The archive goes to a temporary file and is streamed from there, so a large package (weights under
`data/`) never has to fit in memory. Links are followed: the platform gets plain files only.
"""

from __future__ import annotations

import hashlib
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


@dataclass
class PackedPackage:
    path: Path
    name: str
    sha256: str
    size: int

    def chunks(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk


def pack(path: Path, workdir: Path) -> PackedPackage:
    """Validate the package here first (a bad config fails before any upload), then tar and hash it."""
    from ballast.package import load_package  # here: the config models are slow to import, most commands need none

    package = load_package(path)
    fd, name = tempfile.mkstemp(prefix="ballast-package-", suffix=".tar.gz", dir=workdir)
    out = Path(name)
    with open(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz", dereference=True) as tar:
        for file in package.files():
            tar.add(file, arcname=file.relative_to(package.path).as_posix(), recursive=False)
    digest = hashlib.sha256()
    size = 0
    with open(out, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return PackedPackage(out, package.name, digest.hexdigest(), size)
