"""What crosses the pipe between a Ray pool's backend (platform process) and its agent: one JSON object a line.

A call is `{"id": N, "op": NAME, "args": {...}}`; its answer `{"id": N, "ok": VALUE}` or `{"id": N, "error": TEXT}`.
The agent's first line (id 0) says it is connected, or why not. Specs, handles and statuses travel as plain
dicts, so nothing but JSON is ever decoded on either side.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ballast.backends.base import ReplicaHandle, ReplicaSpec, ReplicaStatus
from ballast.config import ResourcesConfig

HELLO = 0


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    message = json.loads(line)
    if not isinstance(message, dict) or not isinstance(message.get("id"), int):
        raise ValueError("not a message of the Ray agent's protocol")
    return message


def spec_to(spec: ReplicaSpec) -> dict[str, Any]:
    return {"replica_id": spec.replica_id, "deployment": spec.deployment, "version": spec.version,
            "package_path": str(spec.package_path), "env": dict(spec.env),
            "resources": spec.resources.model_dump(), "pool": spec.pool}


def spec_of(d: dict[str, Any]) -> ReplicaSpec:
    return ReplicaSpec(str(d["replica_id"]), str(d["deployment"]), int(d["version"]), Path(d["package_path"]),
                       {str(k): str(v) for k, v in d["env"].items()}, ResourcesConfig.model_validate(d["resources"]),
                       str(d["pool"]))


def handle_to(handle: ReplicaHandle) -> dict[str, Any]:
    return asdict(handle)


def handle_of(d: dict[str, Any]) -> ReplicaHandle:
    return ReplicaHandle(str(d["replica_id"]), d.get("url"), d.get("pid"), d.get("port"), d.get("log_path"),
                         str(d.get("pool") or ""), dict(d.get("data") or {}))


def status_to(status: ReplicaStatus) -> dict[str, Any]:
    return asdict(status)


def status_of(d: dict[str, Any]) -> ReplicaStatus:
    return ReplicaStatus(bool(d["alive"]), d.get("exit_code"), str(d.get("detail") or ""))
