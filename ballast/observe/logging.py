"""Log lines that name the request they belong to.

The request id lives in a context variable set by the server's middleware; a logging filter copies
it onto every record, so user code that logs with the standard `logging` module gets it for free.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import random
import sys
import time

from ballast.observe.tracing import trace_id_var

REQUEST_ID_HEADER = "x-request-id"
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("ballast_request_id", default="-")


# Request ids need uniqueness, not secrecy: 128 bits from a generator seeded from the OS (and reseeded in a
# forked child). os.urandom per request was the largest single cost of a replica's request (a getrandom
# syscall, ~20 us on a loaded machine).
_ids = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))


def new_request_id() -> str:
    return f"{_ids.getrandbits(128):032x}"


def current_request_id() -> str:
    return request_id_var.get()


class _RequestIdFilter(logging.Filter):
    """Request id on every record; with tracing on, the trace id too (` trace=<id>` in text, so lines without
    a trace read as before), which links a log line to its trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        trace_id = trace_id_var.get()
        record.trace_id = trace_id
        record.trace = f" trace={trace_id}" if trace_id else ""
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "msg": record.getMessage(),
        }
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            out["trace_id"] = trace_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str | None = None, fmt: str | None = None) -> None:
    """Route all logging through one handler on stderr: text by default, JSON with BALLAST_LOG_FORMAT=json."""
    level = (level or os.environ.get("BALLAST_LOG_LEVEL") or "INFO").upper()
    fmt = fmt or os.environ.get("BALLAST_LOG_FORMAT", "text")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-5s [%(request_id)s%(trace)s] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # uvicorn's access log duplicates our own request logging; keep its errors.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
