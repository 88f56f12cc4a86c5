"""Replicas against their own OpenAPI document (/openapi.json): a Python model and an LLM on the engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import Replica, write_package
from tests.contract import CONTRACT_SETTINGS, load_schema, nodeid_shim

MODEL = """
class Model:
    def predict(self, inputs):
        return {"echo": inputs}

    def chat_completions(self, request):
        return {"object": "chat.completion", "choices": [], "echo": request}

    async def embeddings(self, request):
        return {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 1.0]}]}
"""


@pytest.fixture(autouse=True)
def _nodeid(request: pytest.FixtureRequest) -> None:
    nodeid_shim(request)


def _serve(pkg: Path) -> Iterator[Replica]:
    rep = Replica(pkg)
    try:
        rep.wait_ready(180)
        yield rep
    finally:
        rep.stop()


@pytest.fixture(scope="module")
def python_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    pkg = write_package(tmp_path_factory.mktemp("py") / "contract", """
        name: contract
        model: model.py:Model
        runtime: {max_request_bytes: 65536}
        """, MODEL)
    yield from _serve(pkg)


@pytest.fixture(scope="module")
def llm_replica(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    pkg = write_package(tmp_path_factory.mktemp("llm") / "tiny", f"""
        name: tiny
        engine:
          kind: native
          checkpoint: {tiny_checkpoint}
          served_model_name: tiny-chat
          max_model_len: 256
          max_num_seqs: 16
          max_num_batched_tokens: 256
          kv_cache_memory: 16Mi
          default_max_tokens: 4  # the contract is about shapes, not lengths: short answers keep ~1,000 cases quick
        """)
    yield from _serve(pkg)


@pytest.fixture(scope="module")
def python_schema(python_replica: Replica) -> schemathesis.BaseSchema:
    return load_schema(python_replica.url, "/openapi.json")


@pytest.fixture(scope="module")
def llm_schema(llm_replica: Replica) -> schemathesis.BaseSchema:
    return load_schema(llm_replica.url, "/openapi.json")


python_api = schemathesis.pytest.from_fixture("python_schema")
llm_api = schemathesis.pytest.from_fixture("llm_schema")


@python_api.parametrize()
@CONTRACT_SETTINGS
def test_python_model_replica_matches_its_openapi(case: schemathesis.Case) -> None:
    case.call_and_validate()


# positive_data_acceptance is excluded where a schema-valid request can rightly be a documented 400:
# - generation and /tokenize: whether a prompt fits max_model_len is a count of tokens, which no JSON Schema can
#   state (a prompt that does not fit is 400 context_length_exceeded; so is a chat template refusing a message
#   order);
# - /detokenize and the integer parameters above: JSON Schema's "integer" includes 1.0, which the engine refuses
#   where it takes token ids and counts (integers only, as OpenAI's API).
# Every other check runs on them.
# - /v1/responses: as chat completions (it runs as one), and its input items are checked by their `type`.
_TOKEN_DEPENDENT = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/tokenize", "/detokenize"}


@llm_api.parametrize()
@CONTRACT_SETTINGS
def test_llm_replica_matches_its_openapi(case: schemathesis.Case) -> None:
    excluded = [positive_data_acceptance] if case.operation.path in _TOKEN_DEPENDENT else []
    case.call_and_validate(excluded_checks=excluded)


def test_replica_documents_what_it_serves(python_replica: Replica) -> None:
    paths = httpx.get(python_replica.url + "/openapi.json").json()["paths"]
    assert {"/predict", "/v1/chat/completions", "/v1/embeddings", "/health", "/metrics"} <= set(paths)
    assert "/v1/completions" not in paths  # this model defines no completions()
    assert set(paths["/predict"]["post"]["responses"]) >= {"200", "400", "413", "429", "500", "503", "504"}
