"""The durable async queue in the store: submit, claim, finish, cancel, expire, and webhook bookkeeping.

Claims are conditional updates (`... WHERE id = ? AND status = 'QUEUED'`), so two claimers never take the
same row on either database; on PostgreSQL the candidate rows are read with `FOR UPDATE SKIP LOCKED` so
concurrent claimers do not even wait on each other, and SQLite serializes writers by itself. A platform
that dies with requests IN_PROGRESS loses none: each claim holds a lease that the running dispatcher renews,
and a request whose lease ran out goes back to QUEUED (`recover`; on SQLite, whose store belongs to one platform
process, at once when the platform starts again). A request runs at least once, and its webhook carries the
same `webhook-id` on every attempt.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from ballast.control.errors import ControlError
from ballast.control.times import iso
from ballast.store import AsyncRequest, utcnow

QUEUED, IN_PROGRESS, SUCCEEDED, FAILED = "QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED"
EXPIRED, CANCELED, WEBHOOK_FAILED = "EXPIRED", "CANCELED", "WEBHOOK_FAILED"
TERMINAL = frozenset({SUCCEEDED, FAILED, EXPIRED, CANCELED, WEBHOOK_FAILED})
LEASE_S = float(os.environ.get("BALLAST_ASYNC_LEASE_S") or 30.0)  # a claim lapses this long after its last renewal
MAX_RUN_ATTEMPTS = 3  # a request whose replica vanished is queued again this many times, then FAILED


@dataclass(frozen=True)
class AsyncPolicy:
    """A deployment's `async:` section, as the dispatcher applies it."""

    max_queue: int = 1000
    max_concurrency: int = 8
    result_ttl_s: float = 0.0


@dataclass(frozen=True)
class Claimed:
    id: str
    deployment: str
    target: str
    kind: str
    key_id: str
    payload: dict[str, Any]
    attempts: int
    batch_id: str | None
    priority: int = 1  # the request's queue priority, 0 first (batch lines: BATCH_PRIORITY)


@dataclass(frozen=True)
class Submission:
    """One async request to queue (`AsyncQueue.submit_many`)."""

    deployment: str
    target: str
    kind: str
    key_id: str
    payload: dict[str, Any]
    webhook_endpoint: str | None
    priority: int
    max_time_in_queue_s: float
    max_queue: int


@dataclass(frozen=True)
class Delivery:
    id: str
    webhook_id: str
    endpoint: str
    attempts: int
    body: dict[str, Any]


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def view(r: AsyncRequest) -> dict[str, Any]:
    """The public state of a request (never its input or output)."""
    return {"request_id": r.id, "deployment": r.deployment, "model": r.target, "version": r.version,
            "status": r.status, "priority": r.priority, "attempts": r.attempts, "created_at": iso(r.created_at),
            "expires_at": iso(r.expires_at), "started_at": iso(r.started_at), "finished_at": iso(r.finished_at),
            "webhook": {"endpoint": r.webhook_endpoint, "state": r.webhook_state, "attempts": r.webhook_attempts,
                        "delivered_at": iso(r.delivered_at), "last_error": r.webhook_error},
            "errors": r.errors or [], "result_available": r.result is not None and r.result_expires_at is not None}


class AsyncQueue:
    def __init__(self, sessions: sessionmaker[Session], run_id: str | None = None, lease_s: float = LEASE_S):
        self.sessions = sessions
        self.run_id = run_id or os.urandom(8).hex()
        self.lease_s = lease_s
        self.postgres = sessions.kw["bind"].dialect.name == "postgresql"

    # ---- submission ---------------------------------------------------------------------------
    def submit(self, *, deployment: str, target: str, kind: str, key_id: str, payload: dict[str, Any],
               webhook_endpoint: str | None, priority: int, max_time_in_queue_s: float, max_queue: int) -> str:
        """Queue one request; 429 when the deployment's queue is full."""
        out = self.submit_many([Submission(deployment, target, kind, key_id, payload, webhook_endpoint, priority,
                                           max_time_in_queue_s, max_queue)])[0]
        if isinstance(out, ControlError):
            raise out
        return out

    def submit_many(self, subs: list[Submission]) -> list[str | ControlError]:
        """Queue many requests in one transaction (group commit: one fsync for all); each gets its id, or a 429
        when its deployment's queue is full. Nothing is acknowledged before the commit returns."""
        now = utcnow()
        out: list[str | ControlError] = []
        rows: list[dict[str, Any]] = []
        with self.sessions() as s:
            depth = self._depths(s, {x.deployment for x in subs})
            for x in subs:
                if depth[x.deployment] >= x.max_queue:
                    out.append(ControlError(429, f"the async queue of `{x.deployment}` is full ({x.max_queue} "
                                            "requests); retry later", "queue_full"))
                    continue
                depth[x.deployment] += 1
                rid = new_id("req-")
                out.append(rid)
                rows.append({"id": rid, "deployment": x.deployment, "target": x.target, "kind": x.kind,
                             "key_id": x.key_id, "priority": x.priority, "status": QUEUED, "payload": x.payload,
                             "created_at": now, "expires_at": now + timedelta(seconds=x.max_time_in_queue_s),
                             "webhook_endpoint": x.webhook_endpoint,
                             "webhook_id": new_id("msg_") if x.webhook_endpoint else None,
                             "webhook_state": "none", "attempts": 0, "webhook_attempts": 0})
            if rows:
                s.execute(insert(AsyncRequest), rows)
            s.commit()
        return out

    @staticmethod
    def _depths(s: Session, deployments: set[str]) -> dict[str, int]:
        """Queued requests per deployment (batch lines have their own bound, MAX_LINES a batch)."""
        got = dict(s.execute(select(AsyncRequest.deployment, func.count()).where(
            AsyncRequest.deployment.in_(sorted(deployments)), AsyncRequest.status == QUEUED,
            AsyncRequest.batch_id.is_(None)).group_by(AsyncRequest.deployment)).tuples().all())
        return {d: int(got.get(d, 0)) for d in deployments}

    # ---- reads --------------------------------------------------------------------------------
    def get(self, rid: str) -> tuple[str, dict[str, Any]] | None:
        """(owner key id, public view) of a request."""
        with self.sessions() as s:
            r = s.get(AsyncRequest, rid)
            return (r.key_id, view(r)) if r is not None else None

    def result(self, rid: str) -> dict[str, Any] | None:
        """The kept output ({status, body}) while its `result_ttl_s` lasts."""
        with self.sessions() as s:
            r = s.get(AsyncRequest, rid)
            if r is None or r.result is None or r.result_expires_at is None:
                return None
            return r.result

    def depths(self) -> dict[str, int]:
        """Queued requests per target (`chat`, `chat@staging`, `chat:3`): load for the autoscaler."""
        with self.sessions() as s:
            rows = s.execute(select(AsyncRequest.target, func.count()).where(AsyncRequest.status == QUEUED)
                             .group_by(AsyncRequest.target)).all()
        return {t: int(n) for t, n in rows}

    # ---- state changes ------------------------------------------------------------------------
    def cancel(self, rid: str) -> dict[str, Any]:
        with self.sessions() as s:
            n = s.execute(update(AsyncRequest).where(AsyncRequest.id == rid, AsyncRequest.status == QUEUED)
                          .values(status=CANCELED, finished_at=utcnow(), payload=None)).rowcount  # type: ignore[attr-defined]
            s.commit()
            r = s.get(AsyncRequest, rid)
            assert r is not None
            if not n:
                raise ControlError(409, f"request {rid} is {r.status}: only a QUEUED request can be canceled",
                                   "not_cancelable")
            return view(r)

    def recover(self, startup: bool = False) -> int:
        """Claims whose lease ran out (their dispatcher died) go back to the queue. At startup on SQLite every claim
        does: the file belongs to this home's one platform process, so no other run can be holding one."""
        cond = [AsyncRequest.status == IN_PROGRESS]
        if self.postgres or not startup:
            cond.append((AsyncRequest.lease_until < utcnow()) | AsyncRequest.lease_until.is_(None))
        with self.sessions() as s:
            n = s.execute(update(AsyncRequest).where(*cond)
                          .values(status=QUEUED, claimed_by=None, lease_until=None)).rowcount  # type: ignore[attr-defined]
            s.commit()
        return int(n or 0)

    def renew(self) -> None:
        """Extend the leases of this run's claims (the dispatcher calls this well within `lease_s`)."""
        with self.sessions() as s:
            s.execute(update(AsyncRequest).where(AsyncRequest.claimed_by == self.run_id,
                                                 AsyncRequest.status == IN_PROGRESS)
                      .values(lease_until=utcnow() + timedelta(seconds=self.lease_s)))
            s.commit()

    def release(self) -> int:
        """This run stops: its unfinished claims go back to the queue at once (no one waits for their leases)."""
        with self.sessions() as s:
            n = s.execute(update(AsyncRequest).where(AsyncRequest.claimed_by == self.run_id,
                                                     AsyncRequest.status == IN_PROGRESS)
                          .values(status=QUEUED, claimed_by=None, lease_until=None)).rowcount  # type: ignore[attr-defined]
            s.commit()
        return int(n or 0)

    def claim(self, deployment: str, n: int, skip_keys: Collection[str] = ()) -> list[Claimed]:
        """Take up to `n` queued requests of a deployment, highest priority (0) and oldest first (none of the
        batch lines of `skip_keys`, keys over a limit for now)."""
        if n <= 0:
            return []
        now = utcnow()
        with self.sessions() as s:
            q = (select(AsyncRequest.id).where(AsyncRequest.deployment == deployment, AsyncRequest.status == QUEUED,
                                               AsyncRequest.expires_at > now)
                 .order_by(AsyncRequest.priority, AsyncRequest.created_at).limit(n))
            if skip_keys:
                q = q.where(AsyncRequest.batch_id.is_(None) | AsyncRequest.key_id.not_in(list(skip_keys)))
            if self.postgres:
                q = q.with_for_update(skip_locked=True)
            ids = list(s.scalars(q))
            got: list[Claimed] = []
            for rid in ids:
                done = s.execute(update(AsyncRequest).where(AsyncRequest.id == rid, AsyncRequest.status == QUEUED)
                                 .values(status=IN_PROGRESS, claimed_by=self.run_id, started_at=now,
                                         lease_until=now + timedelta(seconds=self.lease_s),
                                         attempts=AsyncRequest.attempts + 1)).rowcount  # type: ignore[attr-defined]
                if done:
                    r = s.get(AsyncRequest, rid)
                    assert r is not None
                    s.refresh(r)
                    got.append(Claimed(r.id, r.deployment, r.target, r.kind, r.key_id, r.payload or {}, r.attempts,
                                       r.batch_id, r.priority))
            s.commit()
        return got

    def requeue(self, rid: str, tried: bool = True) -> None:
        """The request did not reach a replica (none ready, replica gone), or (`tried` False) was not sent at all:
        back to the queue."""
        with self.sessions() as s:
            s.execute(update(AsyncRequest).where(AsyncRequest.id == rid, AsyncRequest.status == IN_PROGRESS,
                                                 AsyncRequest.claimed_by == self.run_id)
                      .values(status=QUEUED, claimed_by=None, lease_until=None,
                              attempts=AsyncRequest.attempts - (0 if tried else 1)))
            s.commit()

    def finish(self, rid: str, *, ok: bool, version: int | None, result: dict[str, Any] | None,
               errors: list[dict[str, Any]], result_ttl_s: float) -> None:
        """Record the outcome; the input is dropped, the output kept only for the webhook or the TTL."""
        now = utcnow()
        with self.sessions() as s:
            r = s.get(AsyncRequest, rid)
            if r is None or r.status != IN_PROGRESS or r.claimed_by != self.run_id:
                return  # canceled meanwhile, or its lease lapsed and another run has it now
            r.status = SUCCEEDED if ok else FAILED
            r.lease_until = None
            r.version, r.errors, r.finished_at, r.payload = version, errors or None, now, None
            keep = result_ttl_s > 0 or r.webhook_endpoint is not None or r.batch_id is not None
            r.result = result if keep else None
            r.result_expires_at = now + timedelta(seconds=result_ttl_s) if result_ttl_s > 0 else None
            if r.webhook_endpoint:
                r.webhook_state, r.webhook_next_at = "pending", now
            s.commit()

    def expire_due(self) -> int:
        """Queued requests past `max_time_in_queue_s` leave the queue unrun (their webhook says so)."""
        now = utcnow()
        with self.sessions() as s:
            rows = list(s.scalars(select(AsyncRequest).where(AsyncRequest.status == QUEUED,
                                                             AsyncRequest.expires_at <= now).limit(500)))
            for r in rows:
                r.status, r.finished_at, r.payload = EXPIRED, now, None
                r.errors = [{"code": "expired", "message": "the request was not started within max_time_in_queue_s"}]
                if r.webhook_endpoint:
                    r.webhook_state, r.webhook_next_at = "pending", now
            s.commit()
        return len(rows)

    # ---- webhooks -----------------------------------------------------------------------------
    def due_deliveries(self, limit: int = 32) -> list[Delivery]:
        now = utcnow()
        with self.sessions() as s:
            rows = s.scalars(select(AsyncRequest).where(AsyncRequest.webhook_state == "pending",
                                                        AsyncRequest.webhook_next_at <= now)
                             .order_by(AsyncRequest.webhook_next_at).limit(limit)).all()
            return [Delivery(r.id, r.webhook_id or r.id, r.webhook_endpoint or "", r.webhook_attempts,
                             webhook_body(r)) for r in rows]

    def delivered(self, rid: str) -> None:
        self._delivery_done(rid, "delivered", None)

    def delivery_failed(self, rid: str, error: str, retry_at: datetime | None) -> None:
        """One attempt failed: try again at `retry_at`, or (None) give up: WEBHOOK_FAILED."""
        if retry_at is None:
            self._delivery_done(rid, "failed", error)
            return
        with self.sessions() as s:
            s.execute(update(AsyncRequest).where(AsyncRequest.id == rid).values(
                webhook_attempts=AsyncRequest.webhook_attempts + 1, webhook_next_at=retry_at, webhook_error=error))
            s.commit()

    def _delivery_done(self, rid: str, state: str, error: str | None) -> None:
        now = utcnow()
        with self.sessions() as s:
            r = s.get(AsyncRequest, rid)
            if r is None or r.webhook_state != "pending":
                return
            r.webhook_state, r.webhook_attempts, r.webhook_error = state, r.webhook_attempts + 1, error
            if state == "delivered":
                r.delivered_at = now
            else:
                r.status = WEBHOOK_FAILED
            if r.result_expires_at is None and r.batch_id is None:
                r.result = None  # delivered or given up: the output is not kept
            s.commit()

    def sweep_results(self) -> int:
        """Drop outputs whose `result_ttl_s` has passed (once no webhook still needs them)."""
        now = utcnow()
        with self.sessions() as s:
            n = s.execute(update(AsyncRequest).where(AsyncRequest.result_expires_at <= now,
                                                     AsyncRequest.webhook_state != "pending")
                          .values(result=None, result_expires_at=None)).rowcount  # type: ignore[attr-defined]
            s.commit()
        return int(n or 0)


def webhook_body(r: AsyncRequest) -> dict[str, Any]:
    """The Standard Webhooks payload of a finished request."""
    res = r.result or {}
    data = res.get("body") if r.status == SUCCEEDED else None
    return {"request_id": r.id, "deployment": r.deployment, "version": r.version,
            "type": "async_request.completed" if r.status == SUCCEEDED else f"async_request.{r.status.lower()}",
            "time": iso(r.finished_at or utcnow()), "data": data, "errors": r.errors or []}
