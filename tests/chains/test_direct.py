"""The pieces of a hop between deployed steps, in this process: the SSE reader and the choice of a replica."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from ballast.chains import direct
from ballast.chains.direct import Replicas
from ballast.chains.remote import ChainKey, Client, _events
from ballast.observe import free_port


async def _lines(*chunks: bytes) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c


def test_sse_events_are_read_whole_with_their_names() -> None:
    async def read() -> list[tuple[str, str]]:
        return [e async for e in _events(_lines(b'data: {"a":1}\n', b"\n", b"event: error\n", b"data: x\n",  # type: ignore[arg-type]
                                                b"data: y\n", b"\n", b": comment\n", b"\n", b"data:2\r\n", b"\r\n"))]

    assert asyncio.run(read()) == [("", '{"a":1}'), ("error", "x\ny"), ("", "2")]


def test_a_replica_is_picked_by_fewest_calls_in_flight_then_in_turn() -> None:
    async def run() -> None:
        client = Client()
        # The gateway is not there: background refreshes fail and leave the list as it is.
        replicas = Replicas(f"http://127.0.0.1:{free_port()}/replicas", ChainKey("bk_x", "http://x", "c"), client)
        try:
            assert replicas.pick() is None  # no list yet: through the gateway
            replicas.urls, replicas.fetched = ["http://a", "http://b"], time.monotonic()
            assert {replicas.pick(), replicas.pick()} == {"http://a", "http://b"}  # ties in turn
            replicas.inflight["http://a"] = 2
            assert [replicas.pick() for _ in range(3)] == ["http://b"] * 3
            replicas.failed()  # a direct call failed: the gateway for a while
            assert replicas.pick() is None
            replicas.urls, replicas.suspended_until = ["http://a"], 0.0
            replicas.fetched = time.monotonic() - direct.STALE_S - 1  # an old list is not used
            assert replicas.pick() is None
            await asyncio.sleep(0.05)
        finally:
            await client.session().close()

    asyncio.run(run())
