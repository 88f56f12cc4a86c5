"""Schemathesis against a live server: the OpenAPI document it serves must be the truth about it."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings

# Small enough that each server's run stays well under a minute on a shared 2-core machine; every check
# runs on every case (`--checks all`), so the budget buys operations and statuses, not repetition.
CONTRACT_SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck),
                             derandomize=True)


def load_schema(base_url: str, path: str, headers: dict[str, str] | None = None) -> schemathesis.BaseSchema:
    config = schemathesis.Config()
    config.projects.default.update(base_url=base_url, headers=headers or {}, request_timeout=60)
    return schemathesis.openapi.from_url(base_url + path, config=config)


def nodeid_shim(request) -> None:  # type: ignore[no-untyped-def]
    """schemathesis's lazy pytest loader reads `node._nodeid`, which pytest 9 no longer has: give it one."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid
