"""A dependency that is another deployment: the same `StepHandle` rules, the call made through the gateway.

The caller's request id and what is left of its deadline travel in an envelope around the inputs; a
`ChainError` raised on the far side comes back as an error body (code `chain_<kind>`, param = the step) and
is raised here again as the same `ChainError`, so a deployed chain fails exactly like a local one.
"""

from __future__ import annotations

from typing import Any

import httpx

from ballast.chains.chainlet import Contract, Dependency
from ballast.chains.context import current_request_id, remaining_s
from ballast.chains.errors import ChainError, Kind
from ballast.chains.handle import StepHandle

ENVELOPE = "__ballast_chain__"
KINDS: dict[str, Kind] = {"chain_error": "error", "chain_contract": "contract", "chain_deadline": "deadline"}


def envelope(inputs: dict[str, Any], request_id: str, deadline_s: float | None) -> dict[str, Any]:
    """The body of one hop: the step's inputs plus the request id and the seconds left."""
    return {ENVELOPE: {"request_id": request_id, "deadline_s": deadline_s}, "inputs": inputs}


def decode_error(status: int, body: Any, step: str, request_id: str) -> ChainError:
    """Turn an error response back into the `ChainError` it was (or one naming the step the call was for)."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("code") in KINDS and err.get("param"):
        return ChainError(str(err["param"]), request_id, str(err.get("message", "")), KINDS[str(err["code"])])
    message = err.get("message") if isinstance(err, dict) else str(body)[:300]
    return ChainError(step, request_id, f"HTTP {status} from the gateway: {message}")


class RemoteHandle(StepHandle):
    """`self.embed` when Embed runs as its own deployment: `POST {gateway}/deployments/{name}/predict`."""

    def __init__(self, contract: Contract, dep: Dependency, gateway_url: str, deployment: str, api_key: str,
                 client: httpx.AsyncClient) -> None:
        super().__init__(None, contract, dep)  # type: ignore[arg-type]
        self.url = f"{gateway_url.rstrip('/')}/deployments/{deployment}/predict"
        self.api_key = api_key
        self.client = client

    async def _once(self, inputs: dict[str, Any]) -> Any:
        rid = current_request_id()
        payload = self._contract.inputs.model_validate(inputs).model_dump(mode="json")
        headers = {"Authorization": f"Bearer {self.api_key}", "x-request-id": rid}
        r = await self.client.post(self.url, json=envelope(payload, rid, remaining_s()), headers=headers)
        try:
            body = r.json()
        except ValueError:
            body = r.text
        if r.status_code != 200:
            raise decode_error(r.status_code, body, self.step, rid)
        return body
