"""Captured request/response pairs (opt-in, redacted before writing) and imported examples, grouped in datasets.

One row per example. `messages` is the conversation as the caller sent it, `completion` the answer (an assistant
message); `correction` (from POST /v1/feedback) is the preferred completion when set. Rows expire at `expires_at`
(the capture's retention); imported rows have none.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from ballast.store.tables import Base, utcnow


class DatasetRecord(Base):
    __tablename__ = "dataset_records"
    __table_args__ = (Index("ix_dataset_records_dataset", "dataset", "id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset: Mapped[str] = mapped_column(String(63))
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)  # captured rows only
    key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the key that made the request
    deployment: Mapped[str | None] = mapped_column(String(63), nullable=True)
    source: Mapped[str] = mapped_column(String(16))  # capture, import
    messages: Mapped[list[Any]] = mapped_column(JSON)
    completion: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    rating: Mapped[Any] = mapped_column(JSON, nullable=True)
    correction: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
