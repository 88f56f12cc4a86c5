"""`ballast serve` and `ballast predict`: one replica in the foreground, and a client for it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from ballast.cli.credentials import Credentials, auth_hint, endpoint_credentials
from ballast.cli.options import KeyOpt, make_console

console = make_console()
err = make_console(stderr=True)


def serve(
    path: Annotated[Path, typer.Argument(help="Package directory (with ballast.yaml).")],
    port: Annotated[int, typer.Option(help="Port to listen on; 0 picks a free one.")] = 8080,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    no_isolation: Annotated[
        bool, typer.Option("--no-isolation", help="Use the current Python environment for requirements.")
    ] = False,
    access_log: Annotated[bool, typer.Option(
        "--access-log", help="Log one line per request (client, method, path, status) to stderr; off by default, "
        "when a replica logs only its lifecycle and errors.")] = False,
) -> None:
    """Serve one replica of a package in the foreground; prints `ready: URL` when the model has loaded.

    Requirements go into a cached environment under $BALLAST_HOME/envs (default ~/.ballast)."""
    from ballast.package import ensure_environment, load_package

    package = load_package(path)
    reqs = package.config.requirements
    if reqs and not no_isolation and not os.environ.get("BALLAST_IN_ENV"):
        with err.status(f"preparing environment for {len(reqs)} requirement(s)..."):
            site = ensure_environment(reqs, log=lambda m: err.print(m))
        if site is not None:
            pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
            env = {**os.environ, "BALLAST_IN_ENV": "1", "PYTHONPATH": pythonpath}
            args = [sys.executable, "-m", "ballast.cli.main", "serve", str(package.path), "--port", str(port),
                    "--host", host, "--no-isolation"]
            if access_log:
                args.append("--access-log")
            os.execve(sys.executable, args, env)
    from ballast.runtime.serve import serve_package

    serve_package(package, host=host, port=port, access_log=access_log)


def _parse_data(data: str) -> Any:
    raw = Path(data[1:]).read_text() if data.startswith("@") else data
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"--data is not valid JSON: {e}") from None


def predict(
    url: Annotated[str, typer.Argument(help="Replica URL (http://127.0.0.1:8080) or a full route URL.")],
    data: Annotated[str, typer.Option("--data", "-d", help="JSON inputs, or @file.json.")] = "{}",
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 600.0,
    api_key: KeyOpt = None,
) -> None:
    """Send inputs to a model and print the result (streams when the model streams)."""
    payload = _parse_data(data)
    if httpx.URL(url).path in ("", "/"):
        url = url.rstrip("/") + "/predict"
    creds = endpoint_credentials(url, api_key)
    try:
        with httpx.Client(timeout=timeout, headers=creds.headers()) as client, \
                client.stream("POST", url, json=payload) as r:
            if r.status_code >= 400:
                r.read()
                raise ValueError(error_message(r, creds))
            if r.headers.get("content-type", "").startswith("text/event-stream"):
                _print_events(r)
            else:
                r.read()
                console.print_json(r.text) if _is_json(r.text) else console.print(r.text)
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach {url}: {e}") from None


def _print_events(r: httpx.Response) -> None:
    """Print each SSE data chunk as it arrives, until `[DONE]`; an `error` event raises."""
    event = None
    for line in r.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            chunk = line[5:].strip()
            if chunk == "[DONE]":
                break
            if event == "error":
                raise ValueError(_error_text(chunk))
            console.print(chunk, highlight=False, soft_wrap=True)
        elif not line:
            event = None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _error_text(body: str) -> str:
    try:
        e = json.loads(body)["error"]
        return f"{e['message']} ({e.get('code') or e.get('type')})"
    except (ValueError, KeyError, TypeError):
        return body[:500]


def error_message(r: httpx.Response, creds: Credentials) -> str:
    """`HTTP 401: message (code)`, with a hint about the key when auth failed."""
    return f"HTTP {r.status_code}: {_error_text(r.text)}{auth_hint(r.status_code, creds)}"


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(predict)
