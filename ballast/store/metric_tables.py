"""Metrics history: the platform's own compact time series (`control/metrics_history.py` writes and reads it).

One row per (deployment, resolution, bucket) holding every series of that bucket as a JSON object, so the table
holds at most deployments x buckets rows, whatever the traffic: 8,640 buckets of 10 s (a day) and 8,640 of
5 min (30 days) per deployment. Nothing is written per request.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from ballast.store.tables import Base


class MetricPoint(Base):
    __tablename__ = "metric_points"
    deployment: Mapped[str] = mapped_column(String(63), primary_key=True)
    resolution: Mapped[int] = mapped_column(Integer, primary_key=True)  # seconds per bucket (10 or 300)
    ts: Mapped[int] = mapped_column(Integer, primary_key=True)  # bucket start, Unix seconds
    values: Mapped[dict[str, Any]] = mapped_column(JSON)  # series name -> value (null when not measured)
