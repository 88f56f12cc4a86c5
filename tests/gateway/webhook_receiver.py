"""A real loopback webhook receiver: verifies every delivery with the `standardwebhooks` package and counts them."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook


class Receiver:
    def __init__(self, secret: str | None = None, fail_first: int = 0, status: int = 500):
        self.secret = secret
        self.fail_first = fail_first  # answer `status` to this many deliveries first
        self.status = status
        self.attempts: list[dict[str, Any]] = []  # every delivery attempt: headers and body
        self.delivered: dict[str, list[dict[str, Any]]] = {}  # webhook-id -> verified payloads (duplicates kept)
        self.bad_signatures = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                code = receiver._receive(headers, body)
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _receive(self, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            self.attempts.append({"headers": headers, "body": body})
            if len(self.attempts) <= self.fail_first:
                return self.status
            try:
                payload = Webhook(self.secret).verify(body, headers) if self.secret else json.loads(body)
            except Exception:
                self.bad_signatures += 1
                return 400
            self.delivered.setdefault(headers["webhook-id"], []).append(payload)
            return 204

    def by_request(self) -> dict[str, list[dict[str, Any]]]:
        with self._lock:
            out: dict[str, list[dict[str, Any]]] = {}
            for payloads in self.delivered.values():
                out.setdefault(payloads[0]["request_id"], []).extend(payloads)
            return out

    def ids_by_request(self) -> dict[str, set[str]]:
        """request id -> the webhook-ids its deliveries carried (exactly one each: the idempotency key)."""
        with self._lock:
            out: dict[str, set[str]] = {}
            for wid, payloads in self.delivered.items():
                for p in payloads:
                    out.setdefault(p["request_id"], set()).add(wid)
            return out

    def duplicates(self) -> int:
        """Deliveries beyond the first of one webhook-id (a receiver deduplicating on webhook-id ignores them)."""
        with self._lock:
            return sum(len(v) - 1 for v in self.delivered.values())

    def wait_for(self, n: int, timeout: float = 60) -> dict[str, list[dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.by_request()
            if len(got) >= n:
                return got
            time.sleep(0.05)
        raise AssertionError(f"{len(self.by_request())} of {n} webhooks arrived within {timeout}s")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
