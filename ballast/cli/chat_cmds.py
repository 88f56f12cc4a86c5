"""`ballast chat URL`: an interactive terminal chat with streaming output."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import httpx
import typer

from ballast.cli.credentials import Credentials, endpoint_credentials
from ballast.cli.options import KeyOpt, make_console
from ballast.cli.serve_cmds import error_message

console = make_console()


def _stream_reply(client: httpx.Client, url: str, body: dict[str, Any], creds: Credentials) -> str:
    text = []
    with client.stream("POST", url, json=body) as r:
        if r.status_code >= 400:
            r.read()
            raise ValueError(error_message(r, creds))
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise ValueError(chunk["error"].get("message", "stream error"))
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {}).get("content")
                if delta:
                    text.append(delta)
                    console.print(delta, end="", soft_wrap=True, markup=False)
    console.print()
    return "".join(text)


def chat(
    url: Annotated[str, typer.Argument(help="Replica or gateway URL, e.g. http://127.0.0.1:8080")],
    model: Annotated[str, typer.Option(help="Model name to send.")] = "chat",
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per reply.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    api_key: KeyOpt = None,
) -> None:
    """Chat with a model in the terminal (streaming); /reset clears the history, /exit or Ctrl-D quits."""
    base = url.rstrip("/")
    endpoint = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
    creds = endpoint_credentials(endpoint, api_key)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    with httpx.Client(timeout=httpx.Timeout(300, connect=10), headers=creds.headers()) as client:
        while True:
            try:
                line = console.input("[bold cyan]you>[/] ") if interactive else sys.stdin.readline()
            except (EOFError, KeyboardInterrupt):
                break
            if not interactive and not line:
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                history = history[:1] if system else []
                continue
            history.append({"role": "user", "content": line})
            console.print("[bold green]model>[/] ", end="")
            body = {"model": model, "messages": history, "stream": True, "max_tokens": max_tokens,
                    "temperature": temperature}
            try:
                reply = _stream_reply(client, endpoint, body, creds)
            except httpx.HTTPError as e:
                raise ValueError(f"cannot reach {endpoint}: {e}") from None
            history.append({"role": "assistant", "content": reply})


def register(app: typer.Typer) -> None:
    app.command()(chat)
