"""Choosing a replica for a request.

- Least outstanding requests with power-of-two choices: the default; cheap and near-optimal.
- Prefix-aware: requests that share a prompt prefix (a system prompt plus a conversation's first
  message, or an explicit `x-ballast-session`) go to the replica that already holds that prefix in
  its KV cache: the router remembers where each prefix went (an LRU map of key digests). A prefix seen
  for the first time is cached nowhere, so it goes to the least loaded replica (ties broken by
  rendezvous hashing). Bounded load moves a prefix off a replica whose outstanding requests exceed both
  (1 + epsilon) times the mean and the mean plus a small slack, so one hot prefix never swamps a
  replica, and light load never breaks affinity.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Endpoint:
    """One ready replica as the gateway sees it."""

    replica_id: str
    url: str
    version: int
    outstanding: int = 0
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def available(self, now: float) -> bool:
        return self.ejected_until <= now


def affinity_digest(key: bytes) -> bytes:
    """What the router remembers of a prefix key (never the prompt itself)."""
    return hashlib.blake2b(key, digest_size=16).digest()


def _score(key: bytes, replica_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(key + replica_id.encode(), digest_size=8).digest(), "big")


class Router:
    """Picks endpoints; `key` (a prefix or session key) switches on prefix-aware routing."""

    def __init__(self, load_epsilon: float = 0.5, load_slack: int = 4, rng: random.Random | None = None,
                 max_affinity: int = 100_000):
        self.load_epsilon = load_epsilon
        # An LLM replica batches many sequences, and a cache miss costs a whole prefill: at low load the
        # preferred replica may take `load_slack` requests above the mean before work spills over.
        self.load_slack = load_slack
        self.rng = rng or random.Random()
        # Where each prefix went last (a digest of the key -> replica id), least recently used first.
        self._affinity: OrderedDict[bytes, str] = OrderedDict()
        self.max_affinity = max_affinity
        # Told (digest, replica id) when a prefix is placed on a replica anew: gateway/shared.py shares it.
        self.on_place: Callable[[bytes, str], None] | None = None

    def remember(self, digest: bytes, replica_id: str) -> None:
        """Where a prefix went (another gateway sent it there): the next choice for it starts from that replica."""
        self._affinity[digest] = replica_id
        self._affinity.move_to_end(digest)
        if len(self._affinity) > self.max_affinity:
            self._affinity.popitem(last=False)

    def choose(
        self, endpoints: Sequence[Endpoint], *, key: bytes | None = None,
        exclude: set[str] | frozenset[str] = frozenset(),
    ) -> Endpoint | None:
        now = time.monotonic()
        candidates = [e for e in endpoints if e.replica_id not in exclude and e.available(now)]
        if not candidates:
            # Every replica is ejected: trying one beats failing the request outright.
            candidates = [e for e in endpoints if e.replica_id not in exclude]
            if not candidates:
                return None
        if len(candidates) == 1:
            return candidates[0]
        if key is not None:
            return self._prefix(candidates, key)
        candidates = self._nearest(candidates)
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(candidates, 2)
        return a if a.outstanding <= b.outstanding else b

    def _nearest(self, candidates: list[Endpoint]) -> list[Endpoint]:
        """Replicas in the platform's own pool first (no hop to another cluster or region), while the least
        busy of them carries at most `load_slack` requests more than the least busy replica anywhere; beyond
        that, and when none is left (its pool failed over), every pool's replicas share the load."""
        near = [e for e in candidates if not e.meta.get("remote")]
        if not near or len(near) == len(candidates):
            return candidates
        if min(e.outstanding for e in near) <= min(e.outstanding for e in candidates) + self.load_slack:
            return near
        return candidates

    def _prefix(self, candidates: list[Endpoint], key: bytes) -> Endpoint:
        """The replica this prefix went to last, unless it is overloaded; a new prefix (cached nowhere yet)
        goes to the least loaded replica, ties broken by rendezvous hashing, and is remembered there."""
        mean = (sum(e.outstanding for e in candidates) + 1) / len(candidates)
        bound = max(math.ceil(mean * (1 + self.load_epsilon)), math.floor(mean) + self.load_slack)
        digest = affinity_digest(key)
        owner = self._affinity.get(digest)
        if owner is not None:
            for e in candidates:
                if e.replica_id == owner and e.outstanding < bound:
                    self._affinity.move_to_end(digest)
                    return e
        chosen = min(candidates, key=lambda e: (e.outstanding, -_score(key, e.replica_id)))
        self.remember(digest, chosen.replica_id)
        if self.on_place is not None and owner != chosen.replica_id:
            self.on_place(digest, chosen.replica_id)
        return chosen


PREFIX_CHARS = 4096


def prefix_key(body: dict[str, Any] | None, session: str | None) -> bytes | None:
    """The cache-affinity key of a request: its session, or the prompt's identifying prefix.

    For chat: a digest of the system/developer messages plus the first user message, whole (a long
    shared system prompt must not hide the first user message), which stay the same as a conversation
    grows, so every turn of a conversation lands where its history is cached.
    For completions (no turns to tell conversations apart): the first PREFIX_CHARS characters of the prompt.
    """
    if session:
        return b"s:" + session.encode()
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        digest = hashlib.blake2b(digest_size=16)
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            text = content if isinstance(content, str) else repr(content)
            digest.update(f"{m.get('role')}:{text}\x1e".encode())
            if m.get("role") == "user":
                break
        return b"c:" + digest.digest()
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return b"p:" + prompt[:PREFIX_CHARS].encode()
    return None


class WeightedSplit:
    """Smooth weighted round robin (as nginx does): over any window of sum(weights) requests each
    version gets exactly its share, evenly interleaved, so a 10% canary is 10% and not "about 10%"."""

    def __init__(self, weights: Sequence[tuple[int, int]]):
        self.weights = [(v, w) for v, w in weights if w > 0] or list(weights[:1])
        self.current = {v: 0 for v, _ in self.weights}

    def next(self) -> int:
        total = sum(w for _, w in self.weights)
        for v, w in self.weights:
            self.current[v] += w
        best = max(self.weights, key=lambda vw: self.current[vw[0]])[0]
        self.current[best] -= total
        return best
