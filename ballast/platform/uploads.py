"""Remote deploys: `POST /api/v1/packages` takes a package as a gzipped tar body and deploys it.

A client on another machine cannot name a path on the platform's, so it uploads the package. The body
is streamed to a temporary file under `$BALLAST_HOME/packages` (the same filesystem as the final copy),
bounded by `max_package_bytes` (413 beyond), and its sha256 must equal the `x-ballast-sha256` header
(400 otherwise): a truncated or altered upload never becomes a version. Every member is checked before
anything is extracted (no absolute paths, no `..`, no devices or fifos, no link leaving the package),
the package config is validated, and only then is it stored content-addressed by the control plane,
which renames it into place atomically. A refused upload leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from starlette.concurrency import run_in_threadpool

from ballast.control import ControlError, ControlPlane
from ballast.openai import APIError
from ballast.platform.auth import actor
from ballast.platform.openapi import CheckedJSONRoute, errors
from ballast.platform.schemas import NAME

DEFAULT_MAX_PACKAGE_BYTES = 2 * 2**30
CHECKSUM_HEADER = "x-ballast-sha256"
MAX_MEMBERS = 100_000
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ARCHIVE = {"required": True, "content": {media: {"schema": {"type": "string", "format": "binary"}}
                                          for media in ("application/gzip", "application/octet-stream")}}


def max_package_bytes(request: Request) -> int:
    """The server's limit: `ballast up --max-package-bytes`, else BALLAST_MAX_PACKAGE_BYTES, else 2 GiB."""
    limit = getattr(request.app.state, "max_package_bytes", None)
    if limit:
        return int(limit)
    try:
        return int(os.environ["BALLAST_MAX_PACKAGE_BYTES"])
    except (KeyError, ValueError):
        return DEFAULT_MAX_PACKAGE_BYTES


def _refuse(message: str, code: str = "invalid_archive") -> APIError:
    return APIError(400, message, code=code, param="package")


def check_members(tar: tarfile.TarFile, limit: int) -> list[tarfile.TarInfo]:
    """Every member, or a 400 naming the first unsafe one. Also bounds the unpacked size (a gzip bomb)."""
    members: list[tarfile.TarInfo] = []
    total = 0
    for m in tar:
        if len(members) >= MAX_MEMBERS:
            raise _refuse(f"the archive has more than {MAX_MEMBERS} members")
        name = m.name
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or "\\" in name:
            raise _refuse(f"member {name!r} has an absolute path")
        norm = posixpath.normpath(name)
        if norm == ".." or norm.startswith("../") or ".." in name.split("/"):
            raise _refuse(f"member {name!r} leaves the package (`..`)")
        if m.ischr() or m.isblk() or m.isfifo() or not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            raise _refuse(f"member {name!r} is not a regular file, directory or link")
        if m.issym() or m.islnk():
            target = m.linkname
            resolved = posixpath.normpath(target if m.islnk() else posixpath.join(posixpath.dirname(norm), target))
            if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
                raise _refuse(f"member {name!r} links outside the package ({target!r})")
        total += max(m.size, 0)
        if total > limit:
            raise APIError(413, f"the package unpacks to more than {limit} bytes", code="too_large",
                           param="package")
        members.append(m)
    return members


def unpack(archive: Path, dest: Path, limit: int) -> Path:
    """Extract a checked archive into `dest`; returns the package root (a single top directory, or dest)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = check_members(tar, limit)
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise _refuse(f"not a readable gzipped tar archive: {e}") from None
    entries = list(dest.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else dest


async def receive(request: Request, path: Path, limit: int) -> str:
    """Stream the body to `path` (413 past `limit`); returns its sha256."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"package archive is larger than {limit} bytes", code="too_large", param="package")
    digest = hashlib.sha256()
    size = 0
    with open(path, "wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"package archive is larger than {limit} bytes", code="too_large",
                               param="package")
            digest.update(chunk)
            await run_in_threadpool(f.write, chunk)
    if size == 0:
        raise _refuse("empty body: send the package as a gzipped tar archive")
    return digest.hexdigest()


async def deploy_upload(request: Request, changed: Callable[[Any], Any], *, name: str | None, env: str | None,
                        who: str, verify: Callable[[str], None] | None = None,
                        pools: list[str] | None = None) -> dict[str, Any]:
    """Receive a package archive (streamed, size-limited), `verify` its sha256, unpack it with every member
    checked, and deploy it: the one path of both upload routes. A refusal leaves nothing behind."""
    control: ControlPlane = request.app.state.control
    limit = max_package_bytes(request)
    control.packages_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=control.packages_dir))
    try:
        archive = tmp / "package.tar.gz"
        actual = await receive(request, archive, limit)
        if verify is not None:
            verify(actual)

        def unpack_and_deploy() -> Any:
            root = tmp / "package"
            root.mkdir()
            pkg = unpack(archive, root, limit)
            try:
                source = f"an upload (sha256 {actual[:12]})"
                return changed(control.deploy(pkg, name, env=env, actor=who, source=source, pools=pools))
            except ControlError as e:  # name files inside the package, never the server's temporary path
                e.message = e.message.replace(f"{pkg}/", "").replace(str(pkg), "<package>")
                raise

        result: dict[str, Any] = await run_in_threadpool(unpack_and_deploy)
        result["sha256"] = actual
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def upload_router(changed: Callable[[Any], Any]) -> APIRouter:
    """The upload route (admin keys, as every REST route); `changed` wakes the reconciler."""
    router = APIRouter(prefix="/api/v1", route_class=CheckedJSONRoute)

    @router.post("/packages", tags=["deployments"], status_code=201, responses=errors(400, 404, 409, 413),
                 openapi_extra={"requestBody": _ARCHIVE})
    async def upload_package(request: Request,
                             name: Annotated[str | None, Query(pattern=NAME, max_length=63)] = None,
                             env: Annotated[str | None, Query(pattern=NAME, max_length=63)] = None,
                             pool: Annotated[list[str] | None, Query(max_length=16)] = None,
                             sha256: Annotated[str | None, Header(alias=CHECKSUM_HEADER, max_length=64)] = None,
                             who: str = Depends(actor)) -> dict[str, Any]:
        """Deploy a package uploaded as a gzipped tar archive (the body), checked against the sha256 in
        `x-ballast-sha256`; `name` defaults to the package's; each `pool` pins placement (`ballast deploy --pool`).
        The answer is the one of a deploy."""
        expected = (sha256 or "").strip().lower()
        if not _SHA256.match(expected):
            raise APIError(400, f"send the archive's sha256 (64 hex digits) in the {CHECKSUM_HEADER} header",
                           code="missing_checksum", param=CHECKSUM_HEADER)

        def verify(actual: str) -> None:
            if actual != expected:
                raise APIError(400, f"checksum mismatch: the body's sha256 is {actual}, the header says {expected}",
                               code="checksum_mismatch", param=CHECKSUM_HEADER)

        return await deploy_upload(request, changed, name=name, env=env, who=who, verify=verify, pools=pool)

    return router
