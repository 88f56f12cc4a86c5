"""ballast.yaml parsing: defaults, strictness, errors that name the file and the key, the JSON schema."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ballast.config import ConfigError, load_config, parse_config
from ballast.config.models import parse_memory
from tests.conftest import EXAMPLES


def test_examples_parse_with_defaults():
    cfg = load_config(EXAMPLES / "echo")
    assert cfg.name == "echo"
    assert cfg.model.module == "model.py" and cfg.model.class_name == "Model"
    assert cfg.runtime.predict_concurrency == 64
    assert cfg.health.failure_threshold == 3
    assert cfg.autoscaling.max_replicas == 2


def test_full_config_round_trip():
    cfg = parse_config(
        {
            "name": "full",
            "model": "serve.py:Predictor",
            "requirements": ["numpy>=1"],
            "environment_variables": {"A": "1"},
            "secrets": ["HF_TOKEN"],
            "resources": {"cpu": 2, "memory": "4Gi", "accelerator": "H100:2"},
            "runtime": {"predict_concurrency": 8, "request_timeout_s": 5, "max_request_bytes": 1024, "max_queue": 3},
            "health": {"startup_timeout_s": 60, "liveness_period_s": 2, "failure_threshold": 5},
            "autoscaling": {"min_replicas": 0, "max_replicas": 4, "concurrency_target": 2,
                            "target_utilization": 0.5, "window_s": 30, "scale_down_delay_s": 10},
        }
    )
    assert cfg.model.module == "serve.py" and cfg.model.class_name == "Predictor"
    assert cfg.resources.accelerator_count == 2 and cfg.resources.memory_bytes == 4 * 2**30
    assert cfg.autoscaling.min_replicas == 0


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"name": "x", "runtime": {"predict_concurency": 2}}, "unknown key `runtime.predict_concurency`"),
        ({"name": "x", "runtime": {"predict_concurrency": "many"}}, "`runtime.predict_concurrency`"),
        ({"name": "x", "resources": {"accelerator": "H100:zero"}}, "`resources.accelerator`"),
        ({"name": "x", "resources": {"memory": "lots"}}, "not a memory size"),
        ({"name": "x", "autoscaling": {"min_replicas": 3, "max_replicas": 1}}, "min_replicas (3) is greater"),
        ({"name": "Bad_Name"}, "`name`"),
        ({}, "missing required key `name`"),
        ({"name": "x", "secrets": ["not a name"]}, "secret name"),
        ({"name": "x", "engine": {"kind": "command"}}, "needs `start`"),
    ],
)
def test_errors_name_the_key(data, expected):
    with pytest.raises(ConfigError) as e:
        parse_config(data, "pkg/ballast.yaml")
    assert str(e.value).startswith("pkg/ballast.yaml: ")
    assert expected in str(e.value)


def test_yaml_syntax_and_missing_file(tmp_path):
    (tmp_path / "ballast.yaml").write_text("name: x\nruntime: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nowhere")


def test_memory_units():
    assert parse_memory("512Mi") == 512 * 2**20
    assert parse_memory("1.5G") == 1_500_000_000
    assert parse_memory(1024) == 1024


def test_schema_command_prints_json_schema():
    out = subprocess.run([sys.executable, "-m", "ballast.cli.main", "schema"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    schema = json.loads(out.stdout)
    assert schema["title"] == "ballast.yaml"
    assert {"name", "runtime", "autoscaling", "resources", "health"} <= set(schema["properties"])
    import jsonschema

    jsonschema.validate({"name": "ok", "runtime": {"max_queue": 1}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "ok", "runtime": {"nope": 1}}, schema)


def test_package_fingerprint_is_content_addressed(tmp_path):
    import shutil

    from ballast.package import load_package

    a = tmp_path / "a"
    shutil.copytree(EXAMPLES / "echo", a)
    b = tmp_path / "b"
    shutil.copytree(EXAMPLES / "echo", b)
    (b / "__pycache__").mkdir(exist_ok=True)
    (b / "__pycache__" / "junk.pyc").write_bytes(b"x")
    assert load_package(a).fingerprint == load_package(b).fingerprint
    (b / "model.py").write_text((b / "model.py").read_text() + "\n# changed\n")
    assert load_package(a).fingerprint != load_package(b).fingerprint


def test_default_adapter_must_be_declared() -> None:
    from pydantic import ValidationError

    from ballast.config.models import NativeEngineConfig

    cfg = NativeEngineConfig(checkpoint="ckpt", adapters={"sql": "adapters/sql"}, default_adapter="sql")
    assert cfg.default_adapter == "sql"
    with pytest.raises(ValidationError, match=r"default_adapter 'nope' is not one of engine\.adapters"):
        NativeEngineConfig(checkpoint="ckpt", adapters={"sql": "adapters/sql"}, default_adapter="nope")
