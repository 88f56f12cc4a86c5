"""A dependency that is another deployment: the same `StepHandle` rules, the call made over HTTP (straight to a
ready replica of the step, see `direct`, or through the gateway); a streaming step's items arrive as SSE events.

The caller's request id, what is left of its deadline and the trace id travel in an envelope around the inputs
(the trace id also as `traceparent`); a `ChainError` raised on the far side comes back as an error body (code
`chain_<kind>`, param = the step) and is raised here again as the same `ChainError`, so a deployed chain fails
exactly like a local one. A step that could not answer at all (its replica died: 502/503) raises
`StepUnavailable`, which the handle retries when the step is idempotent.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from ballast.chains.chainlet import Contract, Dependency
from ballast.chains.context import current_request_id, remaining_s, trace_id_var
from ballast.chains.direct import Replicas
from ballast.chains.errors import ChainError, Kind
from ballast.chains.handle import StepHandle
from ballast.observe.hops import ENVELOPE, IDEMPOTENT_HEADER, trace_headers
from ballast.observe.replica_auth import HEADER

KINDS: dict[str, Kind] = {"chain_error": "error", "chain_contract": "contract", "chain_deadline": "deadline"}
UNAVAILABLE = (502, 503)
DIRECT_VAR = "BALLAST_CHAIN_DIRECT"  # "0": calls between steps go through the gateway, not straight to replicas

__all__ = ["ENVELOPE", "ChainKey", "Client", "RemoteHandle", "StepUnavailable", "decode_error", "envelope"]


class StepUnavailable(ConnectionError):
    """The step gave no answer of its own (no replica, or its replica died mid-call)."""


def envelope(inputs: dict[str, Any], request_id: str, deadline_s: float | None, trace_id: str = ""
             ) -> dict[str, Any]:
    """The body of one hop: the step's inputs plus the request id, the seconds left and the trace id."""
    return {ENVELOPE: {"request_id": request_id, "deadline_s": deadline_s, "trace_id": trace_id or None},
            "inputs": inputs}


def decode_error(status: int, body: Any, step: str, request_id: str) -> ChainError:
    """Turn an error response back into the `ChainError` it was (or one naming the step the call was for)."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("code") in KINDS and err.get("param"):
        return ChainError(str(err["param"]), request_id, str(err.get("message", "")), KINDS[str(err["code"])])
    message = err.get("message") if isinstance(err, dict) else str(body)[:300]
    return ChainError(step, request_id, f"HTTP {status} from the gateway: {message}")


class Client:
    """One aiohttp session per replica, made in the event loop that uses it (a step is built in a worker thread).

    aiohttp rather than httpx: the gateway's own client, and measured 1.2 vs 1.9 ms per call on loopback."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None),
                headers={"content-type": "application/json"})
        return self._session


class ChainKey:
    """The chain's internal key a step replica holds: the one it started with, replaced by `refresh` after a
    rotation (the old key stays valid for a grace period, so calls in flight and calls before the refresh pass)."""

    def __init__(self, value: str, gateway_url: str, chain: str) -> None:
        self.value = value
        self.url = f"{gateway_url.rstrip('/')}/chains/{chain}/internal-key"

    async def refresh(self, client: Client) -> bool:
        """Ask the gateway for the current key; True when it changed."""
        try:
            async with client.session().get(self.url, headers={"Authorization": f"Bearer {self.value}"}) as r:
                body = await r.json() if r.status == 200 else None
        except (aiohttp.ClientError, ValueError):
            return False
        fresh = body.get("key") if isinstance(body, dict) else None
        if not isinstance(fresh, str) or not fresh or fresh == self.value:
            return False
        self.value = fresh
        return True


def _from_a_step(body: Any) -> bool:
    err = body.get("error") if isinstance(body, dict) else None
    return isinstance(err, dict) and err.get("code") in KINDS


class RemoteHandle(StepHandle):
    """`self.embed` when Embed runs as its own deployment: `POST {gateway}/chains/{chain}/steps/{deployment}/
    versions/{n}/run` (a chain version pins the versions of the steps its steps call; the gateway's chain routes
    cancel the call when its caller goes away), or `/deployments/{name}/predict` without a pinned version."""

    def __init__(self, contract: Contract, dep: Dependency, gateway_url: str, deployment: str, api_key: ChainKey,
                 client: Client, version: int | None = None, chain: str = "") -> None:
        super().__init__(None, contract, dep)  # type: ignore[arg-type]
        self.idempotent = dep.target.config.idempotent
        base = gateway_url.rstrip("/")
        self.url = (f"{base}/chains/{chain}/steps/{deployment}/versions/{version}/run" if version and chain
                    else f"{base}/deployments/{deployment}/predict")
        self.api_key = api_key
        self.client = client
        self.direct = Replicas(f"{base}/chains/{chain}/steps/{deployment}/versions/{version}/replicas", api_key,
                               client) if version and chain and os.environ.get(DIRECT_VAR) != "0" else None

    @contextlib.asynccontextmanager
    async def _post(self, body: str, headers: dict[str, str]) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST the hop straight to a ready replica of the step, or through the gateway. The response is released
        on exit (its connection closed when it was not read to its end, which cancels the step)."""
        replicas = self.direct
        url = replicas.pick() if replicas is not None else None
        if replicas is None or url is None:
            r = await self.client.session().post(self.url, data=body, headers=headers)
            try:
                yield r
            finally:
                r.release() if r.content.at_eof() else r.close()
            return
        replicas.inflight[url] = replicas.inflight.get(url, 0) + 1
        try:
            r = await self._direct(replicas, url, body, headers)
            try:
                yield r
            finally:
                r.release() if r.content.at_eof() else r.close()
        finally:
            replicas.inflight[url] -= 1

    async def _direct(self, replicas: Replicas, url: str, body: str, headers: dict[str, str]
                      ) -> aiohttp.ClientResponse:
        """One replica, else the gateway when nothing ran there: the connection did not open, or the replica is
        full or shutting down (the gateway holds the call or routes it elsewhere)."""
        session = self.client.session()
        try:
            direct = {k: v for k, v in headers.items() if k != "Authorization"}
            if token := replicas.tokens.get(url):
                direct[HEADER] = token
            r = await session.post(f"{url}/predict", data=body, headers=direct)
        except aiohttp.ClientConnectorError:
            replicas.failed()
        except aiohttp.ClientError:
            replicas.failed()  # it may have started: the caller decides (retried only if the step is idempotent)
            raise
        else:
            if r.status not in (429, 503) or _from_a_step(await _peek(r)):
                return r
            r.release()
            replicas.failed()
        return await session.post(self.url, data=body, headers=headers)

    def _request(self, inputs: dict[str, Any], deadline_s: float | None) -> tuple[str, dict[str, str]]:
        rid = current_request_id()
        trace = trace_id_var.get()
        payload = self._contract.inputs.model_validate(inputs).model_dump(mode="json")
        headers = {"Authorization": f"Bearer {self.api_key.value}", "x-request-id": rid, **trace_headers(trace),
                   IDEMPOTENT_HEADER: "true" if self.idempotent else "false"}
        return json.dumps(envelope(payload, rid, deadline_s, trace)), headers

    def _refused(self, status: int, text: str) -> Exception:
        """A non-200 answer as the error to raise: the step's own `ChainError`, or `StepUnavailable`."""
        try:
            body = json.loads(text)
        except ValueError:
            body = text
        err = decode_error(status, body, self.step, current_request_id())
        if status in UNAVAILABLE and not _from_a_step(body):
            return StepUnavailable(err.message)
        return err

    async def _once(self, inputs: dict[str, Any]) -> Any:
        body_out, headers = self._request(inputs, remaining_s())
        try:
            async with self._post(body_out, headers) as r:
                status, text = r.status, await r.text()
        except aiohttp.ClientError as e:
            raise StepUnavailable(f"the gateway could not be reached: {e!r}") from None
        if status != 200:
            raise self._refused(status, text)
        return json.loads(text)

    def _open(self, inputs: dict[str, Any]) -> AsyncIterator[Any]:
        return self._items(*self._request(inputs, remaining_s()))

    async def _items(self, body_out: str, headers: dict[str, str]) -> AsyncIterator[Any]:
        """The step's stream (SSE), item by item as it arrives; closing this generator closes the connection, so
        the step's replica (through the gateway) cancels the step's generator."""
        try:
            async with self._post(body_out, {**headers, "accept": "text/event-stream"}) as r:
                if r.status != 200:
                    raise self._refused(r.status, await r.text())
                if r.content_type != "text/event-stream":
                    raise ChainError(self.step, current_request_id(), f"expected a stream, got {r.content_type}")
                async for event, data in _events(r.content):
                    if event == "error":
                        raise self._refused(_status_of(data), data)
                    yield json.loads(data)
        except aiohttp.ClientError as e:
            raise StepUnavailable(f"the stream from the step broke: {e!r}") from None


async def _peek(r: aiohttp.ClientResponse) -> Any:
    try:
        return json.loads(await r.read())
    except ValueError:
        return None


def _status_of(data: str) -> int:
    """The status an SSE error event stands for (the replica's or the gateway's error body carries no status of
    its own for stream errors: a step's error is a `chain_*` code, an interrupted stream 502)."""
    try:
        err = json.loads(data).get("error", {})
    except (ValueError, AttributeError):
        return 500
    return 502 if err.get("code") == "stream_interrupted" else 500


async def _events(content: aiohttp.StreamReader) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of each SSE event, as each arrives."""
    event, data = "", []
    async for raw in content:
        line = raw.decode().rstrip("\r\n")
        if line:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
            continue
        if data:
            yield event, "\n".join(data)
        event, data = "", []
