"""The CLI's client of the platform's REST API: finds the URL and key, turns errors into one line."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from ballast.cli.credentials import LOOPBACK, Credentials, auth_hint, platform_credentials
from ballast.cli.packing import pack


class PlatformClient:
    """The REST API client; the URL and key come from `credentials.platform_credentials` (the one order)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0,
                 profile: str | None = None):
        self.creds = platform_credentials(url, api_key, profile)
        self.url = self.creds.url
        self.api_key = self.creds.api_key
        self.http = httpx.Client(base_url=self.url + "/api/v1", headers=self.creds.headers(), timeout=timeout,
                                 trust_env=False, verify=self.creds.verify)

    @property
    def is_local(self) -> bool:
        return httpx.URL(self.url).host in LOOPBACK

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ValueError(f"cannot reach the platform at {self.url} ({type(e).__name__}); is `ballast up` "
                             "running? (set --url or BALLAST_URL)") from None
        if r.status_code >= 400:
            raise ValueError(error_line(r, self.creds))
        if r.headers.get("content-type", "").startswith("application/json"):
            return r.json()
        return r.text

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=body, **kw)

    def stream_lines(self, path: str, params: dict[str, Any]) -> Iterator[str]:
        try:
            with self.http.stream("GET", path, params=params, timeout=httpx.Timeout(10, read=None)) as r:
                if r.status_code >= 400:
                    r.read()
                    raise ValueError(error_line(r, self.creds))
                yield from r.iter_lines()
        except httpx.HTTPError as e:
            raise ValueError(f"lost the connection to {self.url}: {type(e).__name__}") from None

    def deploy(self, path: Path, name: str | None, env: str | None, pools: list[str] | None = None) -> dict[str, Any]:
        """Upload the package (a checksummed tar.gz, streamed) and deploy it; the same for any platform."""
        with tempfile.TemporaryDirectory(prefix="ballast-deploy-") as tmp:
            packed = pack(path, Path(tmp))
            params: dict[str, Any] = {k: v for k, v in {"name": name, "env": env, "pool": pools}.items() if v}
            headers = {"content-type": "application/gzip", "content-length": str(packed.size),
                       "x-ballast-sha256": packed.sha256}
            return self.request("POST", "/packages", content=packed.chunks(), params=params, headers=headers,
                                timeout=httpx.Timeout(600, connect=10))

    def wait_for(self, name: str, version: int, env: str | None, timeout: float) -> dict[str, Any]:
        """Until `env` serves `version` (or it has a ready replica when env is None); a crash loop fails fast."""
        deadline = time.monotonic() + timeout
        while True:
            d = self.get(f"/deployments/{name}")
            reps = [r for r in d["replicas"] if r["version"] == version]
            ready = any(r["state"] == "ready" for r in reps)
            envs = {e["name"]: e for e in d["environments"]}
            e = envs.get(env) if env else None
            serving = (e["version"], (e["canary"] or {}).get("version")) if e else ()
            landed = env is None or (e is not None and e["pending"] is None and version in serving)
            if ready and landed:
                return d
            looping = [r for r in reps if r["state"] == "crashloop" and r["failures"] >= 2]
            if looping:
                raise ValueError(f"version {version} of {name} is crash-looping: {looping[0]['last_error']}")
            if time.monotonic() > deadline:
                states = ", ".join(r["state"] for r in reps) or "no replicas yet"
                raise ValueError(f"version {version} of {name} not ready within {timeout:g}s ({states}); "
                                 f"see `ballast logs {name} --version {version}`")
            time.sleep(0.5)


def error_line(r: httpx.Response, creds: Credentials | None = None) -> str:
    """One line for a failed response: the server's message and code, plus a hint on auth failures."""
    hint = auth_hint(r.status_code, creds) if creds else ""
    try:
        e = r.json()["error"]
        code = f" ({e['code']})" if e.get("code") else ""
        return f"{e['message']}{code}{hint}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {r.status_code}: {r.text[:300]}{hint}"
