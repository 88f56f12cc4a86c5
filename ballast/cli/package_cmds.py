"""`ballast init`, `ballast schema`, `ballast version`: working with package files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from ballast import __version__

_YAML = """\
# yaml-language-server: $schema=https://ballast.dev/schema/ballast.json  (or: ballast schema > schema.json)
name: {name}
description: A new Ballast model.
model: model.py:Model
requirements: []
resources:
  cpu: 1
  memory: 1Gi
runtime:
  predict_concurrency: 4
  request_timeout_s: 60
autoscaling:
  min_replicas: 1
  max_replicas: 1
"""

_MODEL = '''\
"""The {name} model. Ballast calls load() once, then predict() for every request."""

from typing import Any


class Model:
    def __init__(self, config=None, data_dir=None, secrets=None):
        self._ready = False

    def load(self) -> None:
        # Load weights here (from data_dir or an installed package); runs before the replica is ready.
        self._ready = True

    def predict(self, inputs: Any) -> Any:
        text = str(inputs.get("text", "")) if isinstance(inputs, dict) else str(inputs)
        return {{"text": text, "length": len(text)}}
'''


def init(
    name: Annotated[str, typer.Argument(help="Package name; also the directory created.")],
    directory: Annotated[Path | None, typer.Option(help="Where to create it (default ./NAME).")] = None,
) -> None:
    """Scaffold a package that serves as-is: `ballast serve NAME`."""
    if not re.match(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", name):
        raise ValueError(f"{name!r} is not a valid name: use lowercase letters, digits and dashes")
    target = directory or Path(name)
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"{target} exists and is not empty; choose another name or --directory")
    target.mkdir(parents=True, exist_ok=True)
    (target / "ballast.yaml").write_text(_YAML.format(name=name))
    (target / "model.py").write_text(_MODEL.format(name=name))
    (target / "data").mkdir(exist_ok=True)
    typer.echo(f"created {target}/ (ballast.yaml, model.py, data/)\nnext: ballast serve {target}")


def schema() -> None:
    """Print the JSON schema of ballast.yaml (for editors and CI validation)."""
    from ballast.config import json_schema

    typer.echo(json_schema())


def version() -> None:
    """Print Ballast's version."""
    typer.echo(f"ballast {__version__}")


def register(app: typer.Typer) -> None:
    app.command()(init)
    app.command()(schema)
    app.command()(version)
