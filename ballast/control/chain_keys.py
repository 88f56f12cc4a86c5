"""Internal credentials of deployed chains: a key the platform issues, never the user's.

Each chain has one internal API key, scoped to the chain's step deployments with the `inference` scope. The
store keeps only its hash (like every key); its secret is derived from a platform secret (a store setting, as
the webhook signing secret is), the chain's name and the key's generation, so the reconciler can hand it to every
replica of a step it starts (`BALLAST_CHAIN_KEY`), restarts and scale-ups included, without the secret being kept
anywhere. Rotating issues the next generation; the old key stays valid for a grace period (its `revoked_at` is
set in the future), during which running step replicas fetch the new one (`GET /chains/NAME/internal-key`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ballast.config import BallastConfig
from ballast.control.keys import KEY_PREFIX
from ballast.control.times import aware
from ballast.store import ApiKey, Setting, hash_key, utcnow

MASTER_SETTING = "chain_key_secret"
CHAIN_VAR = "BALLAST_CHAIN"  # in a generated step's ballast.yaml: the chain the step belongs to
KEY_VAR = "BALLAST_CHAIN_KEY"  # in a step replica's environment: the chain's internal key
REFRESH_VAR = "BALLAST_CHAIN_KEY_REFRESH_S"  # how often a step replica asks for the current key (default 30)
GENERATION = "chain_key_gen:"  # + chain: the setting holding the generation of the chain's current key


def key_id(chain: str, generation: int = 0) -> str:
    return "key-chain-" + hashlib.sha256((chain if not generation else f"{chain}#{generation}").encode()
                                         ).hexdigest()[:16]


class ChainKeys:
    """Derives chains' internal keys and keeps their hashed rows in step with the chains' deployments."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._master: bytes | None = None
        self._lock = threading.Lock()

    def _master_secret(self) -> bytes:
        with self._lock:
            if self._master is None:
                self._master = self._read_or_create().encode()
            return self._master

    def _read_or_create(self) -> str:
        with self.sessions() as s:
            row = s.get(Setting, MASTER_SETTING)
            if row is not None:
                return row.value
            try:
                s.add(Setting(key=MASTER_SETTING, value=secrets.token_urlsafe(32)))
                s.commit()
            except IntegrityError:  # another platform process made it first
                s.rollback()
        with self.sessions() as s:
            found = s.get(Setting, MASTER_SETTING)
            assert found is not None
            return found.value

    def secret(self, chain: str, generation: int | None = None) -> str:
        """The chain's internal key of `generation` (default: the current one)."""
        if generation is None:
            with self.sessions() as s:
                generation = self.generation(s, chain)
        return self.derived(f"chain:{chain}" if not generation else f"chain:{chain}:{generation}")

    def derived(self, label: str) -> str:
        """A key secret derived from the platform secret and `label` (the same on every platform of one store)."""
        digest = hmac.new(self._master_secret(), label.encode(), hashlib.sha256).digest()
        return KEY_PREFIX + base64.urlsafe_b64encode(digest).decode().rstrip("=")

    @staticmethod
    def generation(s: Session, chain: str) -> int:
        row = s.get(Setting, GENERATION + chain)
        return int(row.value) if row is not None else 0

    def ensure(self, s: Session, chain: str, deployments: Iterable[str]) -> str:
        """The chain's current key row (in `s`'s transaction), allowed to call every step deployment named so far."""
        generation = self.generation(s, chain)
        kid = key_id(chain, generation)
        row = s.get(ApiKey, kid)
        if row is None:
            secret = self.secret(chain, generation)
            row = ApiKey(id=kid, name=f"chain {chain} (internal)", key_hash=hash_key(secret), prefix=secret[:10],
                         scopes=["inference"], deployments=sorted(set(deployments)), created_at=utcnow(),
                         budget_per="month")
            s.add(row)
        else:
            row.deployments = sorted(set(row.deployments or []) | set(deployments))
        return kid

    def rotate(self, s: Session, chain: str, grace_s: float) -> dict[str, Any]:
        """Issue the chain's next key (in `s`'s transaction); the current one is revoked `grace_s` from now."""
        generation = self.generation(s, chain)
        old = s.get(ApiKey, key_id(chain, generation))
        if old is None:
            return {}
        setting = s.get(Setting, GENERATION + chain)
        if setting is None:
            s.add(Setting(key=GENERATION + chain, value=str(generation + 1)))
        else:
            setting.value = str(generation + 1)
        s.flush()
        revoke_at = utcnow() + timedelta(seconds=grace_s)
        older = {key_id(chain, g) for g in range(generation + 1)}
        for row in s.scalars(select(ApiKey).where(ApiKey.id.in_(older))):
            if row.revoked_at is None or aware(row.revoked_at) > revoke_at:
                row.revoked_at = revoke_at  # an older key still in its grace goes no later than this one
        kid = self.ensure(s, chain, old.deployments or [])
        return {"key_id": kid, "previous_key_id": old.id, "generation": generation + 1, "previous_revoked_at":
                revoke_at}

    def current_for(self, chain: str, caller_key_id: str) -> str | None:
        """The chain's current key, for a caller holding one of its keys (current or in its grace), else None."""
        with self.sessions() as s:
            generation = self.generation(s, chain)
        if caller_key_id not in {key_id(chain, g) for g in range(generation + 1)}:
            return None
        return self.secret(chain, generation)

    def replica_env(self, deployment: str, config: BallastConfig) -> dict[str, str]:
        """The environment a step's replica gets: its chain's internal key (nothing for other deployments)."""
        chain = config.environment_variables.get(CHAIN_VAR)
        if not chain or not deployment.startswith(f"{chain}-"):
            return {}
        refresh = os.environ.get(REFRESH_VAR)
        return {KEY_VAR: self.secret(chain), **({REFRESH_VAR: refresh} if refresh else {})}
