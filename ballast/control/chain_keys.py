"""Internal credentials of deployed chains: a key the platform issues, never the user's.

Each chain has one internal API key, scoped to the chain's step deployments with the `inference` scope. The
store keeps only its hash (like every key); its secret is derived from a platform secret (a store setting, as
the webhook signing secret is) and the chain's name, so the reconciler can hand it to every replica of a step
it starts (`BALLAST_CHAIN_KEY`), restarts and scale-ups included, without the secret being kept anywhere.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
from collections.abc import Iterable

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ballast.config import BallastConfig
from ballast.control.keys import KEY_PREFIX
from ballast.store import ApiKey, Setting, hash_key, utcnow

MASTER_SETTING = "chain_key_secret"
CHAIN_VAR = "BALLAST_CHAIN"  # in a generated step's ballast.yaml: the chain the step belongs to
KEY_VAR = "BALLAST_CHAIN_KEY"  # in a step replica's environment: the chain's internal key


def key_id(chain: str) -> str:
    return "key-chain-" + hashlib.sha256(chain.encode()).hexdigest()[:16]


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

    def secret(self, chain: str) -> str:
        return self.derived(f"chain:{chain}")

    def derived(self, label: str) -> str:
        """A key secret derived from the platform secret and `label` (the same on every platform of one store)."""
        digest = hmac.new(self._master_secret(), label.encode(), hashlib.sha256).digest()
        return KEY_PREFIX + base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def ensure(self, s: Session, chain: str, deployments: Iterable[str]) -> str:
        """The chain's key row (in `s`'s transaction), allowed to call every step deployment named so far."""
        kid = key_id(chain)
        row = s.get(ApiKey, kid)
        if row is None:
            secret = self.secret(chain)
            row = ApiKey(id=kid, name=f"chain {chain} (internal)", key_hash=hash_key(secret), prefix=secret[:10],
                         scopes=["inference"], deployments=sorted(set(deployments)), created_at=utcnow(),
                         budget_per="month")
            s.add(row)
        else:
            row.deployments = sorted(set(row.deployments or []) | set(deployments))
        return kid

    def replica_env(self, deployment: str, config: BallastConfig) -> dict[str, str]:
        """The environment a step's replica gets: its chain's internal key (nothing for other deployments)."""
        chain = config.environment_variables.get(CHAIN_VAR)
        if not chain or not deployment.startswith(f"{chain}-"):
            return {}
        return {KEY_VAR: self.secret(chain)}
