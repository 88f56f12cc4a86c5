"""Chains as a unit: each chain version pins one version of every step's deployment; chain environments point
at chain versions, so a chain is promoted and rolled back with its steps together."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ballast.store.tables import Base, utcnow


class ChainVersion(Base):
    __tablename__ = "chain_versions"
    __table_args__ = (UniqueConstraint("chain", "number"), UniqueConstraint("chain", "fingerprint"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chain: Mapped[str] = mapped_column(String(63), index=True)
    number: Mapped[int] = mapped_column(Integer)
    fingerprint: Mapped[str] = mapped_column(String(64))  # of the steps' (deployment, version) pairs
    entry: Mapped[str] = mapped_column(String(63))  # the entry step's deployment
    steps: Mapped[list[Any]] = mapped_column()  # [{"step", "deployment", "version"}], dependencies first
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(64), default="")


class ChainEnvironment(Base):
    __tablename__ = "chain_environments"
    __table_args__ = (UniqueConstraint("chain", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chain: Mapped[str] = mapped_column(String(63), index=True)
    name: Mapped[str] = mapped_column(String(63))
    version: Mapped[int] = mapped_column(Integer)
    previous_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
