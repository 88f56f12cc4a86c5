"""Capacity pools: one row per place replicas run (a set of local processes, or a Ray cluster).

The platform's own backend is the default pool (`local`, or `ray` with `ballast up --backend ray`); its row is
created on the first reconcile, so a platform with no pool configuration keeps working unchanged.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from ballast.store.tables import Base, utcnow


class Pool(Base):
    __tablename__ = "pools"
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # local, ray
    address: Mapped[str | None] = mapped_column(Text, nullable=True)  # the Ray cluster (ray pools)
    region: Mapped[str] = mapped_column(String(63), default="")
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    cloud: Mapped[str] = mapped_column(String(63), default="", server_default="")
    cost_per_hour: Mapped[float | None] = mapped_column(Float, nullable=True)  # per replica; None: not priced
    max_replicas: Mapped[int | None] = mapped_column(Integer, nullable=True)  # capacity; None: what fits
    state: Mapped[str] = mapped_column(String(16), default="active")  # active, draining
    # Failover: a pool that is down takes no replicas until `retry_at`; `failures` in a row grow the wait.
    healthy: Mapped[bool] = mapped_column(Boolean, default=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
