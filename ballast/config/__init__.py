"""Typed model of `ballast.yaml`: the only place a package's settings are defined.

Everything else in Ballast reads these pydantic models, so a key means the same thing in the
runtime, the control plane and the JSON schema that editors use.
"""

from ballast.config.loader import CONFIG_FILENAME, ConfigError, json_schema, load_config, parse_config
from ballast.config.models import (
    AsyncConfig,
    AutoscalingConfig,
    BallastConfig,
    EngineConfig,
    HealthConfig,
    ModelRef,
    ResourcesConfig,
    RoutingConfig,
    RuntimeConfig,
)

__all__ = [
    "CONFIG_FILENAME",
    "AsyncConfig",
    "AutoscalingConfig",
    "BallastConfig",
    "ConfigError",
    "EngineConfig",
    "HealthConfig",
    "ModelRef",
    "ResourcesConfig",
    "RoutingConfig",
    "RuntimeConfig",
    "json_schema",
    "load_config",
    "parse_config",
]
