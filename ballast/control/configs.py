"""Typed version configs: `Version.config` is stored as JSON; everything reads it as a `BallastConfig`.

Parsing is done once per (version id, revision, fingerprint): versions are immutable, and a dev
version changes only with its revision (the fingerprint guards against a database reusing the id of a
deleted version). One cache per process, shared by the planner, the autoscaler and the routes,
so no module copies defaults by hand.
"""

from __future__ import annotations

import threading
from typing import Any

from ballast.config import BallastConfig, ConfigError, parse_config
from ballast.store import Version

_MAX = 4096


class ConfigCache:
    def __init__(self) -> None:
        self._cache: dict[tuple[int, int, str], BallastConfig] = {}
        self._lock = threading.Lock()

    def get(self, v: Version) -> BallastConfig:
        key = (v.id, v.revision, v.fingerprint)
        cfg = self._cache.get(key)
        if cfg is None:
            cfg = parse_stored(v.config)
            with self._lock:
                if len(self._cache) >= _MAX:
                    self._cache.clear()
                self._cache[key] = cfg
        return cfg


def parse_stored(raw: dict[str, Any] | None) -> BallastConfig:
    """A stored config was validated at deploy time; one from an older schema falls back to defaults
    for what no longer parses rather than stopping the platform."""
    data = dict(raw or {})
    try:
        return parse_config(data, "stored config")
    except ConfigError:
        return BallastConfig(name="unparsed")


CONFIGS = ConfigCache()
