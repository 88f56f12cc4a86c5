"""Fine-tuning jobs (OpenAI's `fine_tuning.job`), their events and checkpoints, and the registry of trained adapters.

A job's training data lives in its job directory (`$BALLAST_HOME/finetune/<job>/`, 0700), not here; the store
keeps what the API shows and what supervision needs (the worker's pid and start time, to re-adopt it after a
platform restart).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from ballast.store.tables import Base, utcnow


class FineTuneJob(Base):
    __tablename__ = "finetune_jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), index=True)
    model: Mapped[str] = mapped_column(String(63))  # the base deployment
    base_version: Mapped[int] = mapped_column(Integer)  # its production version when the job was created
    method: Mapped[str] = mapped_column(String(16))  # supervised, dpo
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    training_file: Mapped[str] = mapped_column(String(80))
    validation_file: Mapped[str | None] = mapped_column(String(80), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    ballast: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # {deployment, env, gate}
    # validating_files, queued, running, succeeded, failed, cancelled
    status: Mapped[str] = mapped_column(String(16), index=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(160), nullable=True)
    adapter_name: Mapped[str] = mapped_column(String(63))
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    estimated_finish: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pid_start: Mapped[str | None] = mapped_column(String(32), nullable=True)  # /proc start time: pid reuse check
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # worker starts (resumes count)
    progress_offset: Mapped[int] = mapped_column(BigInteger, default=0)  # bytes of progress.jsonl already read
    cancel_requested: Mapped[bool] = mapped_column(default=False)


class FineTuneEvent(Base):
    __tablename__ = "finetune_events"
    __table_args__ = (Index("ix_finetune_events_job", "job_id", "id"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40))
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")  # message, metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FineTuneCheckpoint(Base):
    __tablename__ = "finetune_checkpoints"
    __table_args__ = (Index("ix_finetune_checkpoints_job", "job_id", "step"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40))
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TrainedAdapter(Base):
    """An adapter a job wrote: where it is and which deployment it was trained on (its name is unique)."""

    __tablename__ = "trained_adapters"
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    deployment: Mapped[str] = mapped_column(String(63))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
