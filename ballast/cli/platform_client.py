"""The CLI's client of the platform's REST API: finds the URL and key, turns errors into one line."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _home() -> Path:
    return Path(os.environ.get("BALLAST_HOME") or Path.home() / ".ballast").expanduser()


def saved_credentials() -> dict[str, str]:
    try:
        data = json.loads((_home() / "credentials.json").read_text())
        return {k: str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class PlatformClient:
    """`url`: --url, BALLAST_URL, the saved one, or http://127.0.0.1:8000; `api_key`: --api-key,
    BALLAST_API_KEY, or the one `ballast up` saved in $BALLAST_HOME/credentials.json (mode 0600)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0):
        saved = saved_credentials()
        self.url = (url or os.environ.get("BALLAST_URL") or saved.get("url") or DEFAULT_URL).rstrip("/")
        if self.url.endswith("/api/v1"):
            self.url = self.url[: -len("/api/v1")]
        self.api_key = api_key or os.environ.get("BALLAST_API_KEY") or saved.get("api_key")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.http = httpx.Client(base_url=self.url + "/api/v1", headers=headers, timeout=timeout, trust_env=False)

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
            raise ValueError(error_line(r))
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
                    raise ValueError(error_line(r))
                yield from r.iter_lines()
        except httpx.HTTPError as e:
            raise ValueError(f"lost the connection to {self.url}: {type(e).__name__}") from None

    def deploy(self, path: Path, name: str | None, env: str | None) -> dict[str, Any]:
        if self.is_local:
            return self.post("/deployments", {"path": str(path.resolve()), "name": name, "env": env})
        # A remote platform: upload the package as a tar.gz (the platform validates it).
        from ballast.package import load_package

        package = load_package(path)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for f in package.files():
                tar.add(f, arcname=str(f.relative_to(package.path)))
        params = {"env": env} if env else {}
        return self.request("POST", f"/deployments/{name or package.name}/versions", content=buf.getvalue(),
                            params=params, headers={"content-type": "application/gzip"})

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


def error_line(r: httpx.Response) -> str:
    try:
        e = r.json()["error"]
        code = f" ({e['code']})" if e.get("code") else ""
        return f"{e['message']}{code}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {r.status_code}: {r.text[:300]}"
