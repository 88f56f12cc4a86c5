"""A loopback HTTP server answering the parts of the Hugging Face Hub's API that `huggingface_hub` calls to
download a model: `GET /api/models/{repo}/revision/{rev}` (the commit), `GET /api/models/{repo}/tree/{rev}`
(files with git blob ids, LFS sha256 and sizes), and `HEAD`/`GET /{repo}/resolve/{rev}/{file}` with
X-Repo-Commit, ETag, X-Linked-Etag/X-Linked-Size for LFS files, Content-Length and Range requests.

It serves one checkpoint directory as one repository, logs every request (method, path, Authorization),
and can misbehave on purpose: cut the connection halfway through one file's body once, or serve bytes
other than those its metadata promises."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


class FakeHub:
    """`with FakeHub(checkpoint_dir, "org/tiny") as hub:` serves it at `hub.url` (the HF_ENDPOINT)."""

    def __init__(self, folder: Path, repo_id: str, *, token: str | None = None):
        self.repo_id, self.token = repo_id, token
        self.files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        self.served = dict(self.files)  # what GET returns; a test may tamper with it
        self.requests: list[dict[str, str | None]] = []  # method, path, authorization, range
        self.cut_once: set[str] = set()  # files whose next GET is cut off halfway
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def is_lfs(self, name: str) -> bool:
        return name.endswith(".safetensors")

    def tree(self) -> list[dict]:
        out = []
        for name, data in self.files.items():
            entry: dict = {"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
            if self.is_lfs(name):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(entry)
        return out

    def log(self) -> list[dict[str, str | None]]:
        with self.lock:
            return list(self.requests)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                with hub.lock:
                    hub.requests.append({"method": self.command, "path": path, "range": self.headers.get("range"),
                                         "authorization": self.headers.get("authorization")})
                if hub.token is not None and self.headers.get("authorization") != f"Bearer {hub.token}":
                    return self._json(401, {"error": "Invalid credentials"}, {"X-Error-Code": "RepoNotFound"})
                api = f"/api/models/{hub.repo_id}/"
                resolve = f"/{hub.repo_id}/resolve/"
                if path.startswith(api + "revision/"):
                    return self._json(200, {"id": hub.repo_id, "sha": COMMIT, "private": hub.token is not None,
                                            "siblings": [{"rfilename": n} for n in hub.files]})
                if path.startswith(api + "tree/"):
                    return self._json(200, hub.tree())
                if path.startswith(resolve):
                    return self._file(path[len(resolve):].partition("/")[2], body)
                return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})

            def _json(self, status: int, obj: object, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                             "X-Repo-Commit": COMMIT, **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _file(self, name: str, body: bool) -> None:
                if name not in hub.files:
                    return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                data, promised = hub.served[name], hub.files[name]
                start = 0
                rng = self.headers.get("range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                if hub.is_lfs(name):
                    sha = hashlib.sha256(promised).hexdigest()
                    self.send_header("ETag", f'"{_git_oid(promised)}"')
                    self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("X-Linked-Size", str(len(promised)))
                else:
                    self.send_header("ETag", f'"{_git_oid(promised)}"')
                self.end_headers()
                if not body:
                    return
                with hub.lock:
                    cut = name in hub.cut_once and start == 0
                    hub.cut_once.discard(name)
                if cut:  # half the body, then the connection drops: the client must resume with a Range
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(data[start:])

        return Handler
