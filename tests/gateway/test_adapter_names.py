"""How the gateway reads an adapter's `model` name (gateway/adapters.py), on a real `Gateway` with routes
applied as the control plane would: unique names, suffixes, the deployment/adapter form, ambiguity."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from ballast.gateway.service import DeploymentRoute, Gateway, VersionRoute
from ballast.openai import APIError
from tests.gateway.test_proxy_failover import StaticSource


def _route(name: str, adapters: dict[int, set[str]]) -> DeploymentRoute:
    versions = {v: VersionRoute(v, [], name, frozenset(a)) for v, a in adapters.items()}
    return DeploymentRoute(name=name, llm=True, versions=versions, environments={"production": [(max(adapters), 100)]})


def test_adapter_model_names() -> None:
    routes = {"chat": _route("chat", {1: {"sql", "shared"}, 2: {"sql", "summ"}}),
              "code": _route("code", {1: {"shared"}})}
    gw = Gateway(StaticSource([], routes), CollectorRegistry())
    gw.apply([], routes)
    split = gw.adapters.split
    assert split("chat") == ("chat", None) and split("chat@staging") == ("chat@staging", None)
    assert split("sql") == ("chat", "sql")
    assert split("sql@staging") == ("chat@staging", "sql") and split("summ:2") == ("chat:2", "summ")
    assert split("code/shared:1") == ("code:1", "shared") and split("chat/shared@prod") == ("chat@prod", "shared")
    assert split("nothing") == ("nothing", None) and split(None) == (None, None)
    with pytest.raises(APIError) as e:
        split("shared")
    assert e.value.status == 400 and "chat/shared" in e.value.message
    gw.adapters.check(routes["chat"], 2, "summ")
    with pytest.raises(APIError) as e:
        gw.adapters.check(routes["chat"], 1, "summ")  # declared by version 2 only
    assert e.value.status == 404
