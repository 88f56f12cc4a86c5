"""Checkpoints from a Hugging Face Hub: `hf:ORG/NAME[@REVISION]`, downloaded once into the model cache.

`huggingface_hub` does the transfer (its cache layout, progress bar, and resume with a Range request
when a connection drops mid-file); this module adds what a replica needs on top: every file checked
against the Hub's own metadata (sha256 of LFS files, git blob id of the others) before the engine reads
it, and an index of verified snapshots so that a replica that starts again makes no request at all
(a branch such as `main` is resolved once; pin `@REVISION` or clean the cache to move on).
The endpoint is `HF_ENDPOINT` (default huggingface.co); the token is passed in, never read here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ballast.engine.errors import EngineError

log = logging.getLogger("ballast.engine.hub")

PREFIX = "hf:"
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_REV = re.compile(r"^[\w./-]+$")


@dataclass(frozen=True)
class HubRef:
    """A parsed `hf:ORG/NAME[@REVISION]`."""

    repo_id: str
    revision: str

    @property
    def key(self) -> str:
        """File name of this reference in the verified index (no path separators)."""
        return f"{self.repo_id.replace('/', '--')}@{self.revision.replace('/', '--')}.json"


def is_hub_ref(name: str) -> bool:
    return name.startswith(PREFIX)


def parse_ref(name: str) -> HubRef:
    """`hf:ORG/NAME[@REVISION]` → HubRef; a malformed reference is a clear error, not a request."""
    body = name[len(PREFIX):]
    repo_id, _, revision = body.partition("@")
    revision = revision or "main"
    if not _REPO.match(repo_id) or ".." in repo_id or not _REV.match(revision) or ".." in revision:
        raise EngineError(f"checkpoint {name!r}: expected hf:ORG/NAME or hf:ORG/NAME@REVISION", "model_not_found")
    return HubRef(repo_id, revision)


def hub_cache() -> Path:
    """Under the models cache, so `ballast cache list|clean --models` covers it."""
    from ballast.home import ballast_home

    return ballast_home() / "models" / "hub"


def _git_blob_id(path: Path) -> str:
    """The git object id of a file (what the Hub reports as `oid` for files not in LFS)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _expected(entry: Any) -> tuple[str, str]:
    """(kind, digest) the Hub promises for one tree entry."""
    if entry.lfs is not None:
        return "sha256", str(entry.lfs.sha256)
    return "git blob id", str(entry.blob_id)


def verify_snapshot(folder: Path, entries: list[Any], name: str) -> None:
    """Every file equals the Hub's metadata, else the bad blob is removed (so a retry downloads it again)
    and the start fails naming the file; the engine never loads a corrupt or tampered checkpoint."""
    for entry in entries:
        path = folder / entry.path
        kind, want = _expected(entry)
        got = _sha256(path) if kind == "sha256" else _git_blob_id(path)
        if got != want:
            real = path.resolve()
            path.unlink(missing_ok=True)
            real.unlink(missing_ok=True)
            raise EngineError(f"checkpoint {name!r}: {entry.path} failed verification ({kind} is {got}, the Hub "
                              f"says {want}); the file was removed, a new start downloads it again",
                              "checkpoint_corrupt")


def _cached(ref: HubRef) -> Path | None:
    """The verified snapshot of this reference, when one was completed before (no request)."""
    index = hub_cache() / ".verified" / ref.key
    try:
        rec = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    folder = Path(rec["folder"])
    if all((folder / f).is_file() for f in rec["files"]):
        return folder
    return None


def _record(ref: HubRef, folder: Path, files: list[str], commit: str) -> None:
    index = hub_cache() / ".verified"
    index.mkdir(parents=True, exist_ok=True)
    tmp = index / (ref.key + ".tmp")
    tmp.write_text(json.dumps({"repo": ref.repo_id, "revision": ref.revision, "commit": commit,
                               "folder": str(folder), "files": files}))
    tmp.replace(index / ref.key)


def download(name: str, token: str | None = None) -> Path:
    """The local snapshot directory of `hf:ORG/NAME[@REVISION]`, downloaded and verified the first time."""
    ref = parse_ref(name)
    cached = _cached(ref)
    if cached is not None:
        return cached
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError as e:  # pragma: no cover - the hub extra is missing
        raise EngineError("hf: checkpoints need huggingface_hub (pip install 'ballast[hub]')",
                          "model_not_found") from e
    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token or False, library_name="ballast")
    try:
        commit = api.model_info(ref.repo_id, revision=ref.revision).sha
        if commit is None:
            raise EngineError(f"checkpoint {name!r}: the Hub named no commit for {ref.revision!r}", "model_not_found")
        entries = [e for e in api.list_repo_tree(ref.repo_id, revision=commit, recursive=True)
                   if getattr(e, "blob_id", None) is not None]
        log.info("downloading %s (%d files, commit %s) into %s", name, len(entries), commit[:12], hub_cache())
        folder = Path(snapshot_download(ref.repo_id, revision=commit, cache_dir=hub_cache(), endpoint=endpoint,
                                        token=token or False, library_name="ballast", max_workers=4))
    except EngineError:
        raise
    except Exception as e:  # the Hub's HTTP errors, connection errors, a full disk: one clear message
        raise EngineError(f"checkpoint {name!r}: download failed: {type(e).__name__}: {e}", "model_not_found") from e
    verify_snapshot(folder, entries, name)
    _record(ref, folder, [e.path for e in entries], commit)
    return folder
