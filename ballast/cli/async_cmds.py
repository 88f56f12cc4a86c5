"""`ballast async submit|get|cancel` and `ballast batches create|list|get|cancel|results`: queued work through the
gateway, with the same URL and key as every other command (`platform_credentials`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from ballast.cli.options import JsonOpt, KeyOpt, UrlOpt, make_console
from ballast.cli.platform_client import PlatformClient, error_line

console = make_console()
async_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)
batches_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)
KINDS = {"predict": None, "chat": "/v1/async/chat/completions", "completions": "/v1/async/completions",
         "embeddings": "/v1/async/embeddings"}
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


class Gateway:
    """The gateway's routes (outside /api/v1) with the platform client's credentials and error lines."""

    def __init__(self, url: str | None, api_key: str | None):
        self.client = PlatformClient(url, api_key)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        return self.client.request(method, self.client.url + path, **kw)

    def text(self, path: str) -> str:
        """A file's content as sent (JSONL: `request` would try to read it as one JSON document)."""
        try:
            r = self.client.http.get(self.client.url + path)
        except httpx.HTTPError as e:
            raise ValueError(f"cannot reach the platform at {self.client.url} ({type(e).__name__})") from None
        if r.status_code >= 400:
            raise ValueError(error_line(r, self.client.creds))
        return r.text


def _show(data: Any, as_json: bool, line: str) -> None:
    if as_json:
        print(json.dumps(data))
    else:
        console.print(line, highlight=False)


def _predict_path(model: str) -> str:
    """chat -> production, chat@staging -> an environment, chat:3 -> a version."""
    if "@" in model:
        name, env = model.split("@", 1)
        return f"/deployments/{name}/environments/{env}/async_predict"
    name, _, version = model.partition(":")
    if version:
        if not version.isdigit():
            raise ValueError(f"`{model}`: a version is a number, as in {name}:3")
        return f"/deployments/{name}/versions/{version}/async_predict"
    return f"/deployments/{name}/async_predict"


def _input(inline: str | None, path: Path | None) -> Any:
    if (inline is None) == (path is None):
        raise ValueError("give the input as --input JSON or --input-file PATH (one of them)")
    text = inline if inline is not None else path.read_text() if path else ""
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"the input is not valid JSON: {e}") from None


@async_app.command()
def submit(
    model: Annotated[str, typer.Argument(help="Deployment: name, name@environment or name:version.")],
    input_: Annotated[str | None, typer.Option("--input", "-i", help="The input as JSON.")] = None,
    input_file: Annotated[Path | None, typer.Option("--input-file", help="A file holding the input JSON.")] = None,
    kind: Annotated[str, typer.Option(help="predict (model_input), or chat, completions, embeddings (an OpenAI "
                                           "body; its `model` is set from MODEL).")] = "predict",
    webhook: Annotated[str | None, typer.Option(help="URL the signed result is POSTed to.")] = None,
    priority: Annotated[int, typer.Option(min=0, max=2, help="0 runs first.")] = 1,
    max_time_in_queue: Annotated[float | None, typer.Option(help="Seconds it may wait before it expires.")] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Queue an async request; prints its id."""
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {', '.join(KINDS)}")
    data = _input(input_, input_file)
    opts: dict[str, Any] = {"priority": priority, "webhook_endpoint": webhook,
                            "max_time_in_queue_s": max_time_in_queue}
    opts = {k: v for k, v in opts.items() if v is not None}
    if kind == "predict":
        path, body = _predict_path(model), {"model_input": data, **opts}
    else:
        if not isinstance(data, dict):
            raise ValueError("an OpenAI request body is a JSON object")
        path, body = str(KINDS[kind]), {**data, "model": model, **opts}
    got = Gateway(url, api_key).call("POST", path, json=body)
    _show(got, as_json, got["request_id"])


@async_app.command()
def get(
    request_id: str,
    result: Annotated[bool, typer.Option("--result", help="Print the kept output (deployments with "
                                                            "async.result_ttl_s).")] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """An async request's status (or, with --result, its kept output)."""
    gw = Gateway(url, api_key)
    if result:
        out = gw.call("GET", f"/async_requests/{request_id}/result")
        _show(out, as_json, json.dumps(out["output"]))
        return
    st = gw.call("GET", f"/async_requests/{request_id}")
    errors = "; ".join(e.get("message", "") for e in st["errors"])
    _show(st, as_json, f"{st['request_id']} {st['status']} (deployment {st['deployment']}, attempts {st['attempts']}"
          f", webhook {st['webhook']['state']}){': ' + errors if errors else ''}")


@async_app.command()
def cancel(request_id: str, url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Cancel a queued async request."""
    st = Gateway(url, api_key).call("DELETE", f"/async_requests/{request_id}")
    _show(st, as_json, f"{st['request_id']} {st['status']}")


def _batch_line(b: dict[str, Any]) -> str:
    c = b["request_counts"] or {}
    errors = (b.get("errors") or {}).get("data") or []
    why = "; ".join(e.get("message") or "" for e in errors[:3])
    return (f"{b['id']} {b['status']} ({c.get('completed', 0)}/{c.get('total', 0)} completed, {c.get('failed', 0)} "
            f"failed){': ' + why if why else ''}")


@batches_app.command()
def create(
    file: Annotated[Path, typer.Argument(help="The JSONL input: one {custom_id, method, url, body} a line.",
                                         exists=True, dir_okay=False)],
    endpoint: Annotated[str, typer.Option(help=", ".join(ENDPOINTS))] = "/v1/chat/completions",
    metadata: Annotated[list[str] | None, typer.Option(help="key=value (repeatable).")] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a JSONL file and start a batch on it (24h window)."""
    meta = dict(m.split("=", 1) for m in metadata or [] if "=" in m)
    if len(meta) != len(metadata or []):
        raise ValueError("--metadata takes key=value")
    gw = Gateway(url, api_key)
    f = gw.call("POST", "/v1/files", files={"file": (file.name, file.read_bytes())}, data={"purpose": "batch"})
    b = gw.call("POST", "/v1/batches", json={"input_file_id": f["id"], "endpoint": endpoint,
                                             "completion_window": "24h", **({"metadata": meta} if meta else {})})
    _show(b, as_json, _batch_line(b))


@batches_app.command("list")
def list_(
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    after: Annotated[str | None, typer.Option(help="The last id of the previous page.")] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Batches, newest first."""
    page = Gateway(url, api_key).call("GET", "/v1/batches", params={"limit": limit, **({"after": after} if after
                                                                                       else {})})
    if as_json:
        print(json.dumps(page))
        return
    for b in page["data"]:
        console.print(_batch_line(b), highlight=False)
    if page["has_more"]:
        console.print(f"more: --after {page['last_id']}", highlight=False)


@batches_app.command("get")
def get_batch(batch_id: str, url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """A batch's status and request counts."""
    b = Gateway(url, api_key).call("GET", f"/v1/batches/{batch_id}")
    _show(b, as_json, _batch_line(b))


@batches_app.command("cancel")
def cancel_batch(batch_id: str, url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Cancel a batch: queued lines are dropped, running ones finish."""
    b = Gateway(url, api_key).call("POST", f"/v1/batches/{batch_id}/cancel")
    _show(b, as_json, _batch_line(b))


@batches_app.command()
def results(
    batch_id: str,
    errors: Annotated[bool, typer.Option("--errors", help="The error file instead of the output file.")] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Print a finished batch's output (or error) file, one JSON line per request."""
    gw = Gateway(url, api_key)
    b = gw.call("GET", f"/v1/batches/{batch_id}")
    file_id = b["error_file_id" if errors else "output_file_id"]
    if not file_id:
        raise ValueError(f"batch {batch_id} ({b['status']}) has no {'error' if errors else 'output'} file"
                         + ("" if b["status"] in ("completed", "expired", "cancelled", "failed") else " yet"))
    print(gw.text(f"/v1/files/{file_id}/content"), end="")


def register(root: typer.Typer) -> None:
    root.add_typer(async_app, name="async", help="Submit, inspect and cancel async requests.")
    root.add_typer(batches_app, name="batches", help="OpenAI-style batches: create from JSONL, follow, fetch results.")
