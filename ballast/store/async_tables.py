"""The durable async queue: one row per async request (and per line of a batch).

A request's input is kept only until it has run, its output only until the webhook is delivered (or
for `async.result_ttl_s` when the deployment opts in); the row itself (status, times) stays for audit.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from ballast.store.tables import Base, utcnow


class AsyncRequest(Base):
    __tablename__ = "async_requests"
    __table_args__ = (
        Index("ix_async_requests_claim", "status", "priority", "created_at"),
        Index("ix_async_requests_webhook", "webhook_state", "webhook_next_at"),
        # A deployment's queued depth (checked on every submission) without reading its finished rows.
        Index("ix_async_requests_depth", "deployment", "status"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    deployment: Mapped[str] = mapped_column(String(63), index=True)
    target: Mapped[str] = mapped_column(String(140))  # chat, chat@staging, chat:3
    kind: Mapped[str] = mapped_column(String(32))  # predict, chat_completions, completions, embeddings
    key_id: Mapped[str] = mapped_column(String(32), index=True)
    batch_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    custom_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=1)  # 0 first, 2 last (batches)
    # QUEUED, IN_PROGRESS, SUCCEEDED, FAILED, EXPIRED, CANCELED, WEBHOOK_FAILED
    status: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # the input; dropped once run
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # {status, body}; dropped after
    errors: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(40), nullable=True)  # the dispatcher run holding it
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)  # renewed while run
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # leaves the queue unrun after this
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    result_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    webhook_endpoint: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook_id: Mapped[str | None] = mapped_column(String(40), nullable=True)  # the same on every attempt
    webhook_state: Mapped[str] = mapped_column(String(12), default="none")  # none, pending, delivered, failed
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    webhook_next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    webhook_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
