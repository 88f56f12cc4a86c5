"""The OpenAI Batch API in the store: input files validated line by line, batches whose lines run through the
async queue at the lowest priority, and the output and error files written when the last line finishes.

validating -> in_progress (the lines are queued in the same transaction that creates the batch) ->
finalizing -> completed | expired (lines not started within the window) ; cancelling -> cancelled; and
failed at once when a line cannot run (an unknown or forbidden model, another endpoint): nothing of a failed
batch is queued, so it holds no queue place and spends no token budget.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from ballast.control.async_queue import CANCELED, EXPIRED, IN_PROGRESS, QUEUED, SUCCEEDED
from ballast.control.errors import ControlError
from ballast.control.times import aware
from ballast.store import AsyncRequest, Batch, BatchFile, utcnow

ENDPOINTS = {"/v1/chat/completions": "chat_completions", "/v1/completions": "completions",
             "/v1/embeddings": "embeddings"}
LINE_KEYS = {"custom_id", "method", "url", "body"}
MAX_LINES = 50_000
# Files (inputs and outputs) are deleted this long after their creation unless the upload asks otherwise
# (`expires_after`, 1 hour to 30 days as OpenAI allows); 0 keeps them until deleted.
RETENTION_S = float(os.environ.get("BALLAST_FILE_RETENTION_DAYS") or 30) * 86400
EXPIRES_AFTER_S = (3600, 30 * 86400)
MAX_BATCH_ERRORS = 100  # a failed batch lists this many of its lines' problems
WINDOWS = {"24h": timedelta(hours=24)}
BATCH_PRIORITY = 2  # after every interactive async request


@dataclass(frozen=True)
class Line:
    custom_id: str
    url: str
    body: dict[str, Any]


def _bad(n: int, message: str) -> ControlError:
    return ControlError(400, f"line {n}: {message}", "invalid_batch_file", "file")


def parse_lines(content: bytes) -> list[Line]:
    """Every line of a batch input file, validated; the first bad line is a 400 naming it."""
    out: list[Line] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(content.split(b"\n"), 1):
        if not raw.strip():
            continue
        line = _parse_line(n, raw)
        if line.custom_id in seen:
            raise _bad(n, f"custom_id `{line.custom_id}` duplicates line {seen[line.custom_id]}")
        seen[line.custom_id] = n
        out.append(line)
        if len(out) > MAX_LINES:
            raise _bad(n, f"a batch holds at most {MAX_LINES} requests")
    if not out:
        raise ControlError(400, "the file has no requests", "invalid_batch_file", "file")
    return out


def _parse_line(n: int, raw: bytes) -> Line:
    """One line: a JSON object {custom_id, method: POST, url, body naming its model}, never streaming."""
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise _bad(n, f"not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(obj, dict):
        raise _bad(n, "each line must be a JSON object {custom_id, method, url, body}")
    if unknown := sorted(set(obj) - LINE_KEYS):
        raise _bad(n, f"unknown field(s) {', '.join(unknown)}")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid or len(cid) > 255:
        raise _bad(n, "custom_id must be a non-empty string (at most 255 characters)")
    if obj.get("method") != "POST":
        raise _bad(n, "method must be POST")
    if obj.get("url") not in ENDPOINTS:
        raise _bad(n, f"url must be one of {', '.join(ENDPOINTS)}")
    body = obj.get("body")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
        raise _bad(n, "body must be a JSON object naming its `model`")
    if body.get("stream"):
        raise _bad(n, "batch requests cannot stream")
    return Line(cid, obj["url"], body)


def _ts(dt: datetime | None) -> int | None:
    d = aware(dt)
    return int(d.timestamp()) if d else None


def file_view(f: BatchFile) -> dict[str, Any]:
    return {"id": f.id, "object": "file", "bytes": f.size, "created_at": _ts(f.created_at), "filename": f.filename,
            "purpose": f.purpose, "status": "processed", "expires_at": _ts(f.expires_at), "status_details": None}


def _expiry(now: datetime, seconds: float | None) -> datetime | None:
    seconds = RETENTION_S if seconds is None else seconds
    return now + timedelta(seconds=seconds) if seconds > 0 else None


def _page(rows: list[Any], limit: int, view: Any) -> dict[str, Any]:
    """An OpenAI list page from `limit + 1` rows."""
    data = [view(r) for r in rows[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}


def batch_view(b: Batch) -> dict[str, Any]:
    return {"id": b.id, "object": "batch", "endpoint": b.endpoint, "input_file_id": b.input_file_id,
            "completion_window": b.completion_window, "status": b.status, "output_file_id": b.output_file_id,
            "error_file_id": b.error_file_id, "errors": {"object": "list", "data": b.errors} if b.errors else None,
            "created_at": _ts(b.created_at), "in_progress_at": _ts(b.in_progress_at), "expires_at": _ts(b.expires_at),
            "finalizing_at": _ts(b.finalizing_at), "completed_at": _ts(b.completed_at), "failed_at": _ts(b.failed_at),
            "expired_at": _ts(b.expired_at), "cancelling_at": _ts(b.cancelling_at),
            "cancelled_at": _ts(b.cancelled_at), "metadata": b.metadata_,
            "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed}}


def _not_found(what: str, ident: str) -> ControlError:
    return ControlError(404, f"no {what} {ident}", "not_found", f"{what.replace(' ', '_')}_id")


class BatchStore:
    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    # ---- files --------------------------------------------------------------------------------
    def create_file(self, key_id: str, filename: str, purpose: str, content: bytes,
                    expires_after_s: float | None = None) -> dict[str, Any]:
        if purpose not in ("batch", "fine-tune"):
            raise ControlError(400, "purpose must be `batch` or `fine-tune` (the purposes this gateway stores)",
                               "invalid_purpose", "purpose")
        if expires_after_s is not None and not EXPIRES_AFTER_S[0] <= expires_after_s <= EXPIRES_AFTER_S[1]:
            raise ControlError(400, f"expires_after[seconds] must be from {EXPIRES_AFTER_S[0]} to {EXPIRES_AFTER_S[1]}",
                               "invalid_expires_after", "expires_after")
        if purpose == "batch":
            parse_lines(content)  # a fine-tune file is checked against its job's method when a job names it
        return self._add_file(key_id, filename, purpose, content, expires_after_s=expires_after_s)

    def _add_file(self, key_id: str, filename: str, purpose: str, content: bytes, s: Session | None = None,
                  expires_after_s: float | None = None) -> dict[str, Any]:
        now = utcnow()
        f = BatchFile(id="file-" + os.urandom(12).hex(), key_id=key_id, purpose=purpose, filename=filename[:255],
                      size=len(content), content=content, created_at=now, expires_at=_expiry(now, expires_after_s))
        if s is not None:
            s.add(f)
            return file_view(f)
        with self.sessions() as own:
            own.add(f)
            own.commit()
            return file_view(f)

    def _file(self, s: Session, file_id: str, key_id: str, admin: bool) -> BatchFile:
        f = s.get(BatchFile, file_id)
        expired = f is not None and f.expires_at is not None and aware(f.expires_at) <= utcnow()  # not swept yet
        if f is None or expired or (f.key_id != key_id and not admin):
            raise _not_found("file", file_id)
        return f

    def get_file(self, file_id: str, key_id: str, admin: bool) -> dict[str, Any]:
        with self.sessions() as s:
            return file_view(self._file(s, file_id, key_id, admin))

    def file_content(self, file_id: str, key_id: str, admin: bool) -> bytes:
        with self.sessions() as s:
            return bytes(self._file(s, file_id, key_id, admin).content)

    def delete_file(self, file_id: str, key_id: str, admin: bool) -> dict[str, Any]:
        with self.sessions() as s:
            s.delete(self._file(s, file_id, key_id, admin))
            s.commit()
        return {"id": file_id, "object": "file", "deleted": True}

    def list_files(self, key_id: str, admin: bool, limit: int, after: str | None,
                   purpose: str | None = None) -> dict[str, Any]:
        """Newest first; `after` is the last id of the previous page."""
        with self.sessions() as s:
            q = select(BatchFile).where((BatchFile.expires_at.is_(None)) | (BatchFile.expires_at > utcnow()))
            if not admin:
                q = q.where(BatchFile.key_id == key_id)
            if purpose:
                q = q.where(BatchFile.purpose == purpose)
            anchor = s.get(BatchFile, after) if after else None
            if anchor is not None:
                q = q.where((BatchFile.created_at < anchor.created_at)
                            | ((BatchFile.created_at == anchor.created_at) & (BatchFile.id < anchor.id)))
            rows = list(s.scalars(q.order_by(BatchFile.created_at.desc(), BatchFile.id.desc()).limit(limit + 1)))
        return _page(rows, limit, file_view)

    def sweep_files(self) -> int:
        """Delete files past their `expires_at` (the dispatcher runs this about once a second)."""
        with self.sessions() as s:
            n = s.execute(delete(BatchFile).where(BatchFile.expires_at <= utcnow())).rowcount  # type: ignore[attr-defined]
            s.commit()
        return int(n or 0)

    # ---- batches ------------------------------------------------------------------------------
    def input_lines(self, file_id: str, key_id: str, admin: bool) -> list[Line]:
        return parse_lines(self.file_content(file_id, key_id, admin))

    def create_batch(self, *, key_id: str, input_file_id: str, endpoint: str, completion_window: str,
                     metadata: dict[str, Any] | None, lines: list[tuple[Line, str]]) -> dict[str, Any]:
        """A batch and its queued lines, in one transaction. `lines`: (line, deployment it resolved to)."""
        now = utcnow()
        b = Batch(id="batch_" + os.urandom(12).hex(), key_id=key_id, endpoint=endpoint, input_file_id=input_file_id,
                  completion_window=completion_window, status="in_progress", metadata_=metadata, total=len(lines),
                  completed=0, failed=0, created_at=now, in_progress_at=now,
                  expires_at=now + WINDOWS[completion_window])
        with self.sessions() as s:
            s.add(b)
            for line, deployment in lines:
                s.add(AsyncRequest(id="batch_req_" + os.urandom(12).hex(), deployment=deployment,
                                   target=line.body["model"], kind=ENDPOINTS[line.url], key_id=key_id, batch_id=b.id,
                                   custom_id=line.custom_id, priority=BATCH_PRIORITY, status=QUEUED,
                                   payload={"body": line.body}, created_at=now, expires_at=b.expires_at,
                                   webhook_state="none", attempts=0, webhook_attempts=0))
            s.commit()
            return batch_view(b)

    def fail_batch(self, *, key_id: str, input_file_id: str, endpoint: str, completion_window: str,
                   metadata: dict[str, Any] | None, errors: list[dict[str, Any]]) -> dict[str, Any]:
        """A batch refused at validation, as OpenAI reports it: status `failed` with its errors, nothing queued."""
        now = utcnow()
        b = Batch(id="batch_" + os.urandom(12).hex(), key_id=key_id, endpoint=endpoint, input_file_id=input_file_id,
                  completion_window=completion_window, status="failed", metadata_=metadata,
                  errors=errors[:MAX_BATCH_ERRORS], total=0, completed=0, failed=0, created_at=now, failed_at=now,
                  expires_at=now + WINDOWS[completion_window])
        with self.sessions() as s:
            s.add(b)
            s.commit()
            return batch_view(b)

    def _batch(self, s: Session, batch_id: str, key_id: str, admin: bool) -> Batch:
        b = s.get(Batch, batch_id)
        if b is None or (b.key_id != key_id and not admin):
            raise _not_found("batch", batch_id)
        return b

    def get_batch(self, batch_id: str, key_id: str, admin: bool) -> dict[str, Any]:
        with self.sessions() as s:
            return batch_view(self._batch(s, batch_id, key_id, admin))

    def list_batches(self, key_id: str, admin: bool, limit: int, after: str | None) -> dict[str, Any]:
        with self.sessions() as s:
            q = select(Batch).order_by(Batch.created_at.desc(), Batch.id.desc())
            if not admin:
                q = q.where(Batch.key_id == key_id)
            if after:
                anchor = s.get(Batch, after)
                if anchor is not None:
                    q = q.where((Batch.created_at < anchor.created_at)
                                | ((Batch.created_at == anchor.created_at) & (Batch.id < anchor.id)))
            rows = list(s.scalars(q.limit(limit + 1)))
        return _page(rows, limit, batch_view)

    def cancel_batch(self, batch_id: str, key_id: str, admin: bool) -> dict[str, Any]:
        now = utcnow()
        with self.sessions() as s:
            b = self._batch(s, batch_id, key_id, admin)
            if b.status not in ("validating", "in_progress"):
                raise ControlError(409, f"batch {batch_id} is {b.status}: it cannot be cancelled", "not_cancelable")
            b.status, b.cancelling_at = "cancelling", now
            s.execute(update(AsyncRequest).where(AsyncRequest.batch_id == batch_id, AsyncRequest.status == QUEUED)
                      .values(status=CANCELED, finished_at=now, payload=None))
            s.commit()
            return batch_view(b)

    # ---- progress (the dispatcher runs this about once a second) ------------------------------
    def progress(self) -> int:
        """Update request counts of running batches; finalize those whose every line has finished."""
        with self.sessions() as s:
            ids = list(s.scalars(select(Batch.id).where(Batch.status.in_(("in_progress", "cancelling")))))
        for batch_id in ids:
            self._progress_one(batch_id)
        return len(ids)

    def _progress_one(self, batch_id: str) -> None:
        with self.sessions() as s:
            counts = dict(s.execute(select(AsyncRequest.status, func.count()).where(AsyncRequest.batch_id == batch_id)
                                    .group_by(AsyncRequest.status)).tuples().all())
            b = s.get(Batch, batch_id)
            if b is None:
                return
            b.completed = counts.get(SUCCEEDED, 0)
            b.failed = sum(n for st, n in counts.items() if st not in (SUCCEEDED, QUEUED, IN_PROGRESS, CANCELED))
            if counts.get(QUEUED, 0) or counts.get(IN_PROGRESS, 0):
                s.commit()
                return
            now = utcnow()
            b.finalizing_at = now
            rows = list(s.scalars(select(AsyncRequest).where(AsyncRequest.batch_id == batch_id)
                                  .order_by(AsyncRequest.created_at, AsyncRequest.id)))
            out, err = [], []
            for r in rows:
                if r.status == CANCELED:
                    continue
                res = r.result or None
                response = {"status_code": res.get("status"), "request_id": r.id, "body": res.get("body")} \
                    if res else None
                if r.status == SUCCEEDED:
                    out.append({"id": r.id, "custom_id": r.custom_id, "response": response, "error": None})
                else:
                    e = (r.errors or [{"code": r.status.lower(), "message": f"the request {r.status.lower()}"}])[0]
                    err.append({"id": r.id, "custom_id": r.custom_id, "response": response,
                                "error": {"code": e.get("code"), "message": e.get("message")}})
                r.result = None
            if out:
                b.output_file_id = self._add_file(b.key_id, f"{batch_id}_output.jsonl", "batch_output",
                                                  _jsonl(out), s)["id"]
            if err:
                b.error_file_id = self._add_file(b.key_id, f"{batch_id}_error.jsonl", "batch_output",
                                                 _jsonl(err), s)["id"]
            if b.status == "cancelling":
                b.status, b.cancelled_at = "cancelled", now
            elif counts.get(EXPIRED, 0):
                b.status, b.expired_at = "expired", now
            else:
                b.status, b.completed_at = "completed", now
            s.commit()


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in rows)
