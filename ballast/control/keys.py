"""API keys and usage in the store: create (the secret is shown once, only its hash is kept), list,
revoke, and the per-key, per-hour usage rows the gateway's meter writes in batches.

Usage rows are upserts that add to the counters (`ON CONFLICT ... DO UPDATE SET n = n + excluded.n`),
so concurrent writers (two platform processes on one PostgreSQL) never lose a count.
"""

from __future__ import annotations

import builtins
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from ballast.control.service import ControlError, iso
from ballast.store import ApiKey, Usage, hash_key, period_start, utcnow

KEY_PREFIX = "bk_"
SCOPES = ("inference", "metrics", "admin", "capture", "fine_tune")
PERIODS = ("day", "month")
COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "errors")


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyRecord:
    """A live (unrevoked) key: what the gateway checks each request against, and the limits it enforces."""

    id: str
    key_hash: str
    scopes: frozenset[str]
    deployments: frozenset[str] | None = None  # None: every deployment
    rpm: int | None = None
    tpm: int | None = None
    token_budget: int | None = None
    budget_per: str = "month"
    used_in_period: int = 0  # tokens used in the current budget period when the record was read

    def may_use(self, deployment: str) -> bool:
        return self.deployments is None or deployment in self.deployments

    @property
    def limits(self) -> tuple[int | None, int | None, int | None, str]:
        return (self.rpm, self.tpm, self.token_budget, self.budget_per)


def _view(k: ApiKey) -> dict[str, Any]:
    return {
        "id": k.id, "name": k.name, "prefix": k.prefix, "scopes": list(k.scopes or []),
        "deployments": list(k.deployments) if k.deployments is not None else None, "rpm": k.rpm, "tpm": k.tpm,
        "token_budget": k.token_budget, "budget_per": k.budget_per, "created_at": iso(k.created_at),
        "revoked_at": iso(k.revoked_at),
    }


class KeyStore:
    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def create(self, *, name: str = "", scopes: list[str], deployments: list[str] | None = None,
               rpm: int | None = None, tpm: int | None = None, token_budget: int | None = None,
               budget_per: str = "month") -> dict[str, Any]:
        """A new key; the returned `key` is the only time the secret exists in clear."""
        scopes = sorted(set(scopes))
        if not scopes or any(s not in SCOPES for s in scopes):
            raise ControlError(400, f"scope must be one or more of {', '.join(SCOPES)}", "invalid_scope", "scope")
        if budget_per not in PERIODS:
            raise ControlError(400, "per must be day or month", "invalid_period", "per")
        for what, v in (("rpm", rpm), ("tpm", tpm), ("token_budget", token_budget)):
            if v is not None and v < 1:
                raise ControlError(400, f"{what} must be >= 1", "invalid_limit", what)
        if deployments is not None:
            deployments = sorted({d.strip() for d in deployments if d.strip()})
        secret = new_secret()
        row = ApiKey(id="key-" + os.urandom(6).hex(), name=name[:128], key_hash=hash_key(secret), prefix=secret[:10],
                     scopes=scopes, deployments=deployments, rpm=rpm, tpm=tpm, token_budget=token_budget,
                     budget_per=budget_per, created_at=utcnow())
        with self.sessions() as s, s.begin():
            s.add(row)
            s.flush()
            out = _view(row)
        out["key"] = secret
        return out

    def list(self, include_revoked: bool = False) -> list[dict[str, Any]]:
        with self.sessions() as s:
            q = select(ApiKey).order_by(ApiKey.created_at)
            if not include_revoked:
                q = q.where(ApiKey.revoked_at.is_(None))
            return [_view(k) for k in s.scalars(q).all()]

    def revoke(self, key_id: str) -> dict[str, Any]:
        """Revoke by id or by the key's shown prefix; the gateway drops it within a refresh (<1 s)."""
        with self.sessions() as s, s.begin():
            row = s.scalar(select(ApiKey).where((ApiKey.id == key_id) | (ApiKey.prefix == key_id)))
            if row is None:
                raise ControlError(404, f"no API key {key_id!r}", "key_not_found", "key")
            if row.revoked_at is None:
                if "admin" in (row.scopes or []):
                    admins = [k for k in s.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None),
                                                                         ApiKey.id != row.id)).all()
                              if "admin" in (k.scopes or [])]
                    if not admins:
                        raise ControlError(409, f"{row.id} is the last admin key; create another admin key "
                                           "first", "last_admin_key", "key")
                s.execute(update(ApiKey).where(ApiKey.id == row.id).values(revoked_at=utcnow()))
                s.flush()
                s.refresh(row)
            return _view(row)

    def live(self) -> builtins.list[KeyRecord]:  # `list` is a method of this class
        """Every unrevoked key (a rotated chain key until the end of its grace: revoked in the future), with the
        tokens each budgeted key has used in its current period."""
        now = datetime.now(UTC)
        with self.sessions() as s:
            keys = s.scalars(select(ApiKey).where(or_(ApiKey.revoked_at.is_(None), ApiKey.revoked_at > now))).all()
            used: dict[str, int] = {}
            budgeted = [k for k in keys if k.token_budget is not None]
            for per in {k.budget_per for k in budgeted}:
                ids = [k.id for k in budgeted if k.budget_per == per]
                rows = s.execute(select(Usage.key_id, func.sum(Usage.prompt_tokens + Usage.completion_tokens))
                                 .where(Usage.key_id.in_(ids), Usage.hour >= period_start(per, now))
                                 .group_by(Usage.key_id)).all()
                used.update({k: int(n or 0) for k, n in rows})
        return [KeyRecord(k.id, k.key_hash, frozenset(k.scopes or ()),
                          frozenset(k.deployments) if k.deployments is not None else None, k.rpm, k.tpm,
                          k.token_budget, k.budget_per, used.get(k.id, 0)) for k in keys]

    # ---- usage -----------------------------------------------------------------------------------
    def add_usage(self, rows: builtins.list[dict[str, Any]]) -> None:
        """Add counters to (key, deployment, version, hour) rows in one transaction."""
        if not rows:
            return
        with self.sessions() as s, s.begin():
            dialect = s.get_bind().dialect.name
            ins: Any = postgresql.insert(Usage) if dialect == "postgresql" else sqlite.insert(Usage)
            if dialect not in ("postgresql", "sqlite"):  # pragma: no cover - other databases: read-modify-write
                for r in rows:
                    pk = (r["key_id"], r["deployment"], r["version"], r["hour"])
                    row = s.get(Usage, pk)
                    if row is None:
                        s.add(Usage(**r))
                    else:
                        for c in COUNTERS:
                            setattr(row, c, getattr(row, c) + r[c])
                return
            for r in rows:
                stmt = ins.values(**r)
                s.execute(stmt.on_conflict_do_update(
                    index_elements=["key_id", "deployment", "version", "hour"],
                    set_={c: getattr(Usage, c) + getattr(stmt.excluded, c) for c in COUNTERS}))

    def usage(self, *, key: str | None = None, deployment: str | None = None, since: datetime | None = None,
              group: str = "hour") -> builtins.list[dict[str, Any]]:
        """Usage rows, newest first; `group`: hour (every row), or key / deployment (summed)."""
        with self.sessions() as s:
            key_id = _key_id(s, key) if key is not None else None
            cols = _usage_columns(group)
            sums = [func.sum(getattr(Usage, c)).label(c) for c in COUNTERS]
            q = select(*cols, *sums).group_by(*cols)
            if key_id is not None:
                q = q.where(Usage.key_id == key_id)
            if deployment is not None:
                q = q.where(Usage.deployment == deployment)
            if since is not None:
                q = q.where(Usage.hour >= since.replace(minute=0, second=0, microsecond=0))
            if group == "hour":
                q = q.order_by(Usage.hour.desc(), Usage.key_id, Usage.deployment, Usage.version)
            return [_usage_view(r._asdict()) for r in s.execute(q).all()]


def _key_id(s: Session, key: str) -> str:
    """The id of a key named by its id or its shown prefix; a 404 when there is none."""
    row = s.scalar(select(ApiKey).where((ApiKey.id == key) | (ApiKey.prefix == key)))
    if row is None:
        raise ControlError(404, f"no API key {key!r}", "key_not_found", "key")
    return row.id


def _usage_columns(group: str) -> list[Any]:
    """The columns usage rows are grouped by."""
    if group == "hour":
        return [Usage.key_id, Usage.deployment, Usage.version, Usage.hour]
    if group == "key":
        return [Usage.key_id]
    if group == "deployment":
        return [Usage.deployment]
    raise ControlError(400, "group must be hour, key or deployment", "invalid_group", "group")


def _usage_view(d: dict[str, Any]) -> dict[str, Any]:
    if "hour" in d:
        d["hour"] = iso(d["hour"])
    for c in COUNTERS:
        d[c] = int(d[c] or 0)
    return d
