"""The gateway's data path against real replica processes: auth, routing, failover on kill -9.

The control plane is not the subject here: a fixed in-memory source feeds the gateway the same
snapshot shape the control plane does, and the gateway runs in a real uvicorn server on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections import Counter

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from ballast.control.keys import KeyRecord
from ballast.gateway.routing import Endpoint
from ballast.gateway.service import DeploymentRoute, Gateway, VersionRoute
from ballast.openai import APIError
from ballast.store import hash_key
from tests.conftest import EXAMPLES, free_port, write_package


class StaticSource:
    def __init__(self, keys: list[KeyRecord], routes: dict[str, DeploymentRoute]):
        self.keys = keys
        self.routes = routes
        self.usage: list = []
        self.capacity_requests: list = []

    def snapshot(self):
        return self.keys, self.routes

    def generation(self) -> int:
        return 0  # routes change only through the periodic refresh here

    async def write_usage(self, batch) -> None:
        self.usage.append(batch)

    def request_capacity(self, deployment: str, version: int) -> None:
        self.capacity_requests.append((deployment, version))


class GatewayServer:
    def __init__(self, gateway: Gateway):
        @contextlib.asynccontextmanager
        async def lifespan(_app: Starlette):
            await gateway.start()
            yield
            await gateway.stop()

        app = Starlette(lifespan=lifespan)
        for path, handler, methods in gateway.routes_for_app():
            app.add_route(path, handler, methods=methods)

        async def api_error(_req: Request, exc: Exception) -> Response:
            from ballast.runtime.server import error_response

            return error_response(exc)  # type: ignore[arg-type]

        app.add_exception_handler(APIError, api_error)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, port=self.port, log_config=None, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)


KEY = "sk-test-inference"
OTHER = "sk-test-other"


@pytest.fixture
def two_echo(replica_factory):
    return [replica_factory(EXAMPLES / "echo") for _ in range(2)]


def _source(replicas) -> StaticSource:
    eps = [Endpoint(replica_id=f"r{i}", url=r.url, version=1) for i, r in enumerate(replicas)]
    route = DeploymentRoute(name="echo", llm=False, versions={1: VersionRoute(1, eps)},
                            environments={"production": [(1, 100)]})
    keys = [
        KeyRecord(id="k1", key_hash=hash_key(KEY), scopes=frozenset({"inference"})),
        KeyRecord(id="k2", key_hash=hash_key(OTHER), scopes=frozenset({"inference"}), deployments=frozenset({"x"})),
        KeyRecord(id="k3", key_hash=hash_key("sk-metrics"), scopes=frozenset({"metrics"})),
    ]
    return StaticSource(keys, {"echo": route})


def test_auth_and_resolution_errors(two_echo):
    src = _source(two_echo)
    with GatewayServer(Gateway(src, CollectorRegistry())) as gw:
        url = gw.url + "/deployments/echo/predict"
        r = httpx.post(url, json={"a": 1})
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        r = httpx.post(url, json={"a": 1}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        r = httpx.post(url, json={"a": 1}, headers={"Authorization": "Bearer sk-metrics"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
        r = httpx.post(url, json={"a": 1}, headers={"Api-Key": OTHER})
        assert r.status_code == 403
        r = httpx.post(gw.url + "/deployments/nope/predict", json={}, headers={"Api-Key": KEY})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = httpx.post(url, json={"a": 1}, headers={"Api-Key": KEY})
        assert r.status_code == 200 and r.json() == {"echo": {"a": 1}}
        r = httpx.post(gw.url + "/deployments/echo/versions/1/predict", json=2, headers={"Api-Key": KEY})
        assert r.json() == {"echo": 2}
        models = httpx.get(gw.url + "/v1/models", headers={"Api-Key": OTHER}).json()
        assert models["data"] == []  # hides what the key cannot use
        models = httpx.get(gw.url + "/v1/models", headers={"Api-Key": KEY}).json()
        assert [m["id"] for m in models["data"]] == ["echo"]


def test_kill_minus_nine_during_load_loses_no_request(two_echo):
    src = _source(two_echo)
    victim = two_echo[0]

    async def load(gw_url: str) -> Counter:
        results: Counter = Counter()
        sem = asyncio.Semaphore(8)

        async with httpx.AsyncClient(timeout=30, headers={"Api-Key": KEY}) as client:
            async def one(i: int) -> None:
                async with sem:
                    r = await client.post(gw_url + "/deployments/echo/predict", json={"i": i})
                    results[r.status_code] += 1
                    if r.status_code == 200:
                        assert r.json() == {"echo": {"i": i}}
                if i == 100:
                    os.killpg(victim.proc.pid, signal.SIGKILL)

            await asyncio.gather(*(one(i) for i in range(400)))
        return results

    with GatewayServer(Gateway(src, CollectorRegistry())) as gw:
        results = asyncio.run(load(gw.url))
    assert results == Counter({200: 400})
    assert victim.proc.wait(5) == -signal.SIGKILL


def test_replica_dying_mid_stream_ends_with_an_error_event(replica_factory):
    rep = replica_factory(EXAMPLES / "stream")
    eps = [Endpoint(replica_id="s0", url=rep.url, version=1)]
    src = StaticSource(
        [KeyRecord(id="k1", key_hash=hash_key(KEY), scopes=frozenset({"inference"}))],
        {"stream": DeploymentRoute(name="stream", llm=False, versions={1: VersionRoute(1, eps)},
                                   environments={"production": [(1, 100)]})},
    )
    with GatewayServer(Gateway(src, CollectorRegistry())) as gw:
        lines = []
        body = {"text": " ".join(f"w{i}" for i in range(100)), "delay": 0.05}
        with httpx.stream("POST", gw.url + "/deployments/stream/predict", json=body, headers={"Api-Key": KEY},
                          timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 6:
                    os.killpg(rep.proc.pid, signal.SIGKILL)
    data = [x for x in lines if x.startswith("data:")]
    assert 3 <= len(data) < 100
    assert "event: error" in lines
    assert '"code":"stream_interrupted"' in data[-1]


def test_a_full_replica_spills_to_another_and_all_full_gives_429(replica_factory, tmp_path):
    pkg = write_package(tmp_path / "slow", """
        name: slow
        runtime: {predict_concurrency: 1, max_queue: 0}
        """, "import time\n\nclass Model:\n    def predict(self, x):\n        time.sleep(1.0)\n        return x\n")
    reps = [replica_factory(pkg) for _ in range(2)]
    eps = [Endpoint(replica_id=f"r{i}", url=r.url, version=1) for i, r in enumerate(reps)]
    src = StaticSource(
        [KeyRecord(id="k1", key_hash=hash_key(KEY), scopes=frozenset({"inference"}))],
        {"slow": DeploymentRoute(name="slow", llm=False, versions={1: VersionRoute(1, eps)},
                                 environments={"production": [(1, 100)]})},
    )

    async def burst(gw_url: str, n: int) -> list[httpx.Response]:
        # One session: every request prefers the same replica, which takes one at a time.
        headers = {"Api-Key": KEY, "x-ballast-session": "one-user"}
        async with httpx.AsyncClient(timeout=30, headers=headers) as client:
            async def one(i: int) -> httpx.Response:
                await asyncio.sleep(0.1 * i)  # in order, while the earlier ones still run
                return await client.post(gw_url + "/deployments/slow/predict", json=i)

            return await asyncio.gather(*(one(i) for i in range(n)))

    with GatewayServer(Gateway(src, CollectorRegistry())) as gw:
        two = asyncio.run(burst(gw.url, 2))
        assert [r.status_code for r in two] == [200, 200]
        assert {r.headers["x-ballast-replica"] for r in two} == {"r0", "r1"}  # the second spilled over
        three = asyncio.run(burst(gw.url, 3))
    assert [r.status_code for r in three] == [200, 200, 429]
    assert int(three[2].headers["retry-after"]) >= 1 and three[2].json()["error"]["message"]


class HalfAnswer:
    """A real TCP server on loopback that sends a whole-body answer's headers and part of its body, then
    closes: what the gateway sees when a replica is killed between its header and body writes."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.hits = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.hits += 1
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\r\n{\"ec")
        await writer.drain()
        writer.close()

    def __enter__(self) -> HalfAnswer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_an_answer_cut_before_its_body_is_retried_on_another_replica(replica_factory):
    good = replica_factory(EXAMPLES / "echo")
    with HalfAnswer() as half:
        eps = [Endpoint(replica_id="half", url=half.url, version=1), Endpoint(replica_id="good", url=good.url,
                                                                                version=1)]
        src = StaticSource(
            [KeyRecord(id="k1", key_hash=hash_key(KEY), scopes=frozenset({"inference"}))],
            {"echo": DeploymentRoute(name="echo", llm=False, versions={1: VersionRoute(1, eps)},
                                     environments={"production": [(1, 100)]})},
        )
        with GatewayServer(Gateway(src, CollectorRegistry())) as gw:
            answers = []
            for i in range(50):  # until the router has picked the half-answering replica once
                r = httpx.post(gw.url + "/deployments/echo/predict", json={"i": i}, headers={"Api-Key": KEY})
                answers.append((r.status_code, r.json(), r.headers["x-ballast-replica"]))
                if half.hits:
                    break
    assert half.hits == 1
    assert answers == [(200, {"echo": {"i": i}}, "good") for i in range(len(answers))]
