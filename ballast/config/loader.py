"""Reading `ballast.yaml` into `BallastConfig`, with errors a person can act on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from ballast.config.models import BallastConfig

CONFIG_FILENAME = "ballast.yaml"


class ConfigError(ValueError):
    """A package's config is unreadable or invalid; the message names the file, the key and the fix."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__(f"{self.path}: " + "; ".join(problems))


def _key_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("native", "command", "function-after", "function-before"):
            continue  # discriminator / validator tags pydantic adds to the location
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _describe(err: ErrorDetails) -> str:
    key = _key_path(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key `{key}` (check the spelling; `ballast schema` lists every key)"
    if kind == "missing":
        return f"missing required key `{key}`"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    got = err.get("input")
    shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
    return f"`{key}`: {msg}{shown}"


def parse_config(data: Any, path: str | Path = CONFIG_FILENAME) -> BallastConfig:
    """Validate already-parsed YAML data."""
    if not isinstance(data, dict):
        raise ConfigError(path, ["the file must be a mapping of keys to values (name: ..., model: ...)"])
    try:
        return BallastConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(path, [_describe(err) for err in e.errors()]) from None


def load_config(path: str | Path) -> BallastConfig:
    """Load `ballast.yaml` (or the file inside a package directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_FILENAME
    if not p.is_file():
        raise ConfigError(p, [f"no such file; a package needs a {CONFIG_FILENAME} (try `ballast init NAME`)"])
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(p, [f"not valid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    return parse_config(data or {}, p)


def json_schema() -> str:
    """The JSON schema of `ballast.yaml`, for editors and validation in CI."""
    schema = BallastConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ballast.yaml"
    return json.dumps(schema, indent=2)
