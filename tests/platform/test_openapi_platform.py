"""The platform's REST API against its own OpenAPI document (/api/v1/openapi.json), with an admin key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.contract import CONTRACT_SETTINGS, load_schema, nodeid_shim
from tests.control.platform import Platform


@pytest.fixture(autouse=True)
def _nodeid(request: pytest.FixtureRequest) -> None:
    nodeid_shim(request)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    p = Platform(tmp_path_factory.mktemp("home")).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def platform_schema(platform: Platform) -> schemathesis.BaseSchema:
    return load_schema(platform.url, "/api/v1/openapi.json", {"Authorization": f"Bearer {platform.key}"})


schema = schemathesis.pytest.from_fixture("platform_schema")


@schema.parametrize()
@CONTRACT_SETTINGS
def test_platform_api_matches_its_openapi(case: schemathesis.Case) -> None:
    excluded = []
    if case.operation.path in ("/api/v1/deployments/{name}/versions", "/api/v1/packages") and case.method == "POST":
        # The body must be a gzipped tar of a valid package: a property of bytes that no JSON Schema states, so
        # random bytes are rightly refused with a documented 400 (the upload itself is tested elsewhere).
        excluded.append(positive_data_acceptance)
    if case.operation.path == "/api/v1/datasets/{name}/import":
        # Likewise each line must be a fine-tuning example, which no JSON Schema of a string states (tested elsewhere).
        excluded.append(positive_data_acceptance)
    if case.operation.path in ("/api/v1/evals", "/api/v1/adapters/ship") and case.method == "POST":
        # A `regex:` metric must compile, and a dataset's held-out split must hold examples: properties no JSON
        # Schema states, so some schema-valid bodies get the documented 400 (evals are tested end to end elsewhere).
        excluded.append(positive_data_acceptance)
    if case.operation.path == "/api/v1/keys/{key_id}" and case.method == "DELETE":
        # Keep the admin key this run authenticates with: revoking it would turn every later case into a 401.
        case.path_parameters = {"key_id": "key-does-not-exist"}
    case.call_and_validate(excluded_checks=excluded)


def test_platform_health_answers_like_vllm(platform: Platform) -> None:
    r = httpx.get(platform.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_state_db_is_private(platform: Platform) -> None:
    assert (Path(platform.home) / "state.db").stat().st_mode & 0o777 == 0o600


def test_gateway_routes_answer_405_with_allow(platform: Platform) -> None:
    r = httpx.get(platform.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"
