"""Platform state in SQL: SQLite by default, PostgreSQL by URL, migrated with Alembic."""

from ballast.store.async_tables import AsyncRequest
from ballast.store.batch_tables import Batch, BatchFile
from ballast.store.chain_tables import ChainEnvironment, ChainVersion
from ballast.store.dataset_tables import DatasetRecord
from ballast.store.db import default_url, make_engine, open_store, safe_url, session_factory, upgrade
from ballast.store.finetune_tables import FineTuneCheckpoint, FineTuneEvent, FineTuneJob, TrainedAdapter
from ballast.store.metric_tables import MetricPoint
from ballast.store.pool_tables import Pool
from ballast.store.tables import (
    ApiKey,
    Base,
    Deployment,
    Environment,
    Event,
    Replica,
    Setting,
    Usage,
    Version,
    hash_key,
    period_start,
    utcnow,
)

__all__ = [
    "ApiKey",
    "AsyncRequest",
    "Base",
    "Batch",
    "BatchFile",
    "ChainEnvironment",
    "ChainVersion",
    "DatasetRecord",
    "Deployment",
    "Environment",
    "Event",
    "FineTuneCheckpoint",
    "FineTuneEvent",
    "FineTuneJob",
    "MetricPoint",
    "Pool",
    "Replica",
    "Setting",
    "TrainedAdapter",
    "Usage",
    "Version",
    "default_url",
    "hash_key",
    "make_engine",
    "open_store",
    "period_start",
    "safe_url",
    "session_factory",
    "upgrade",
    "utcnow",
]
