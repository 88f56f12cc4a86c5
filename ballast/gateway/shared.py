"""Gateway state shared by several platform processes through Redis (`ballast up --redis-url`).

Several `ballast up --ha` processes behind one load balancer each run a gateway; with its own buckets each would
let a key through once per gateway. With Redis:

- per-key limits (requests/min, tokens/min, the period's token budget) are one Lua script round trip per request,
  on Redis's clock, so every gateway judges by the same buckets; a finished request's tokens ride along with the
  key's next request (charged before it is judged), or are written on their own after `charge_delay_s`;
- prefix affinity (a digest of the prefix -> replica id, never the prompt) lives in Redis with a TTL: read, its TTL
  renewed, in the same round trip; written (one writer, in order) when a gateway places a prefix anew;
- each gateway publishes its load (in flight and held, requests/s, per deployment and version) with a short TTL,
  and the autoscaler adds every other live gateway's load to its own (`FleetLoad`), so the leader scales for all.

Keys sit under a per-platform prefix and name API keys by id, never by secret. A request of a key without limits
costs a round trip only when it is prefix-routed (one GETEX). When Redis does not answer the gateway logs once, sets
`ballast_gateway_shared_state_up` to 0 and judges in its own buckets (which count every request all along) until its
probe finds Redis back; requests never fail for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as PromCounter
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from ballast.control.autoscaler import Autoscaler, LoadSignal
from ballast.gateway.limits import KeyLimiter, LocalState, period_end
from ballast.gateway.routing import Router, affinity_digest
from ballast.gateway.service import Gateway

log = logging.getLogger("ballast.gateway.shared")

# A token bucket in a hash {l: level, s: stamp}, refilled at `rate` per minute; a missing key is a full bucket, so
# each write sets the TTL to the time the bucket takes to fill up again.
_BUCKETS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, rate)
  local v = redis.call('HMGET', key, 'l', 's')
  if not v[1] then return rate end
  return math.min(rate, tonumber(v[1]) + (now - tonumber(v[2])) * rate / 60)
end
local function put(key, rate, l)
  redis.call('HSET', key, 'l', tostring(l), 's', tostring(now))
  redis.call('EXPIRE', key, math.ceil((rate - l) * 60 / rate) + 1)
end
"""
# KEYS: rpm bucket, tpm bucket, budget counter, the prefix's replica. ARGV: rpm, tpm (0: none), budget (-1: none),
# tokens the store knows were used this period, the prefix's TTL (0: no prefix), tokens this gateway has yet to
# charge to the key and the budget counter's TTL (charged first). Returns {verdict, seconds to wait, the prefix's
# replica or nil}: verdict 0 admitted, 1 over rpm, 2 over tpm, 3 over budget.
ADMIT = _BUCKETS + """
local owner = false
if tonumber(ARGV[5]) > 0 then owner = redis.call('GETEX', KEYS[4], 'EX', ARGV[5]) end
local rpm, tpm, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local pending = tonumber(ARGV[6])
if pending > 0 then
  if tpm > 0 then put(KEYS[2], tpm, level(KEYS[2], tpm) - pending) end
  if budget >= 0 then
    redis.call('INCRBY', KEYS[3], pending)
    redis.call('EXPIRE', KEYS[3], ARGV[7])
  end
end
if budget >= 0 then
  local used = math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), tonumber(ARGV[4]))
  if used >= budget then return {3, '0', owner} end
end
if tpm > 0 then
  local l = level(KEYS[2], tpm)
  if l <= 0 then return {2, tostring((1e-9 - l) * 60 / tpm), owner} end
end
if rpm > 0 then
  local l = level(KEYS[1], rpm)
  if l < 1 then return {1, tostring((1 - l) * 60 / rpm), owner} end
  put(KEYS[1], rpm, l - 1)
end
return {0, '0', owner}
"""
# KEYS: tpm bucket, budget counter. ARGV: tpm (0: none), tokens, the budget counter's TTL (0: no budget).
CHARGE = _BUCKETS + """
local tpm, tokens, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if tpm > 0 then put(KEYS[1], tpm, level(KEYS[1], tpm) - tokens) end
if ttl > 0 then
  redis.call('INCRBY', KEYS[2], tokens)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 0
"""


def safe_redis_url(url: str) -> str:
    """The URL without its password, for logs."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def default_prefix(instance_id: str) -> str:
    """Every platform on one store shares an instance id, so they share state; another platform never does."""
    return os.environ.get("BALLAST_REDIS_PREFIX") or f"ballast:{instance_id}:"


class RedisState(LocalState):
    """The gateway's limits, prefix affinity and load, shared through Redis (a gateway companion)."""

    def __init__(self, url: str, prefix: str, gateway: Gateway, registry: CollectorRegistry | None = None, *,
                 publish_s: float = 0.5, load_ttl_s: float = 3.0, affinity_ttl_s: int = 600, timeout_s: float = 0.5,
                 charge_delay_s: float = 0.05):
        self.url, self.prefix, self.gateway = url, prefix, gateway
        self.id = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"
        self.redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                             retry=Retry(NoBackoff(), 0), decode_responses=True)
        self._admit = self.redis.register_script(ADMIT)
        self._charge = self.redis.register_script(CHARGE)
        self.publish_s, self.load_ttl_s, self.affinity_ttl_s = publish_s, load_ttl_s, affinity_ttl_s
        self.up = True
        self._others: dict[tuple[str, int], float] = {}
        self._done: Counter[tuple[str, int]] = Counter()  # requests finished since the last publish
        self._published = time.monotonic()
        self._writes: set[asyncio.Task[Any]] = set()
        self._charges: dict[tuple[str, ...], tuple[int, int, int]] = {}  # (tpm, budget) keys -> (tpm, tokens, ttl)
        self._placements: dict[str, str] = {}  # Redis key of a prefix -> its replica, not yet written
        self._flushing: asyncio.Task[None] | None = None
        self._charge_timer: asyncio.TimerHandle | None = None
        self.charge_delay_s = charge_delay_s
        self._task: asyncio.Task[None] | None = None
        reg = registry or CollectorRegistry()
        self.m_up = Gauge("ballast_gateway_shared_state_up", "1 while Redis (shared limits, affinity, load) "
                          "answers; 0 while this gateway judges limits on its own", registry=reg)
        self.m_fallbacks = PromCounter("ballast_gateway_shared_state_fallbacks", "Requests whose limits this "
                                       "gateway judged on its own because Redis did not answer", registry=reg)
        self.m_gateways = Gauge("ballast_gateway_live_gateways", "Gateways publishing their load to Redis "
                                "(this one included)", registry=reg)
        self.m_up.set(1)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # ---- limits and prefix affinity -----------------------------------------------------------
    async def admit(self, limiter: KeyLimiter | None, router: Router | None = None,
                    prefix: bytes | None = None) -> None:
        """One round trip: the key's limits (when it has any) and where other gateways sent `prefix` (if any)."""
        judged = limiter if limiter is not None and limiter.limited else None
        digest = affinity_digest(prefix) if prefix is not None and router is not None else None
        if judged is None and digest is None:
            return
        if self.up:
            try:
                verdict, wait, owner = await self._ask(judged, digest)
            except RedisError as e:
                self.lost(e)
            else:
                if owner and digest is not None and router is not None:
                    router.remember(digest, owner)
                if judged is None:
                    return
                if verdict == 0:
                    judged.note_admitted()
                    return
                raise (judged.over_rpm(wait) if verdict == 1 else
                       judged.over_tpm(wait) if verdict == 2 else judged.over_budget())
        if judged is not None:
            self.m_fallbacks.inc()
            judged.admit()

    async def _ask(self, limiter: KeyLimiter | None, digest: bytes | None) -> tuple[int, float, str | None]:
        """(verdict, seconds to wait, the prefix's replica) from Redis."""
        aff = self.key("aff", digest.hex()) if digest is not None else ""
        if limiter is None:
            owner = await self.redis.getex(aff, ex=self.affinity_ttl_s)
            return 0, 0.0, str(owner) if owner else None
        budget = -1 if limiter.token_budget is None else limiter.token_budget
        keys = self._limit_keys(limiter)
        _, pending, ttl = self._charges.pop((keys[1], keys[2]), (0, 0, 0))  # rides along: no write of its own
        reply = await self._admit(keys=[*keys, aff], args=[
            limiter.rpm or 0, limiter.tpm or 0, budget, limiter.used_in_period, self.affinity_ttl_s if aff else 0,
            pending, ttl])
        return int(reply[0]), float(reply[1]), str(reply[2]) if len(reply) > 2 and reply[2] else None

    def _limit_keys(self, limiter: KeyLimiter) -> list[str]:
        # {key id}: a Redis Cluster keeps one key's buckets in one slot, as a script needs.
        tag = "{" + limiter.key_id + "}"
        period = limiter.current_period().strftime("%Y%m%d") if limiter.token_budget is not None else "-"
        return [self.key("rpm", tag), self.key("tpm", tag), self.key("budget", tag, period)]

    def finished(self, limiter: KeyLimiter | None, deployment: str, version: int, tokens: int) -> None:
        """Charge the tokens locally, and in Redis: the key's next admit script charges them first, in the same
        round trip; those still pending after `charge_delay_s` are written in one batch."""
        self._done[(deployment, version)] += 1
        super().finished(limiter, deployment, version, tokens)
        if limiter is None or tokens <= 0 or not (limiter.tpm or limiter.token_budget is not None) or not self.up:
            return
        keys = tuple(self._limit_keys(limiter)[1:])
        ttl = 0
        if limiter.token_budget is not None:
            ttl = math.ceil((period_end(limiter.budget_per) - datetime.now(UTC)).total_seconds()) + 86400
        _, pending, _ = self._charges.get(keys, (0, 0, 0))
        self._charges[keys] = (limiter.tpm or 0, pending + tokens, ttl)
        if self._charge_timer is None:  # the key's next admit (usually sooner) carries the charge instead
            self._charge_timer = asyncio.get_running_loop().call_later(self.charge_delay_s, self._charges_due)

    def _charges_due(self) -> None:
        self._charge_timer = None
        if self._charges:
            self._kick()

    async def flush(self) -> None:
        """Write what is pending now (charges wait up to `charge_delay_s` for a request of theirs to carry them)."""
        self._kick()
        await asyncio.gather(*self._writes)

    def placed(self, digest: bytes, replica_id: str) -> None:
        """The router placed a prefix on a replica anew (Router.on_place): tell the other gateways."""
        if self.up:
            self._placements[self.key("aff", digest.hex())] = replica_id
            self._kick()

    def _kick(self) -> None:
        """One writer at a time, so this gateway's writes land in the order it made them (the latest placement of a
        prefix wins); what comes meanwhile is sent in one batch when the write in flight returns."""
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._write(self._flush()))
            self._writes.add(self._flushing)
            self._flushing.add_done_callback(self._writes.discard)

    async def _flush(self) -> None:
        while self._charges or self._placements:
            placements, self._placements = self._placements, {}
            if len(placements) == 1:
                ((name, replica_id),) = placements.items()
                await self.redis.set(name, replica_id, ex=self.affinity_ttl_s)
            elif placements:
                pipe = self.redis.pipeline(transaction=False)
                for name, replica_id in placements.items():
                    pipe.set(name, replica_id, ex=self.affinity_ttl_s)
                await pipe.execute()
            await self._flush_charges()

    async def _flush_charges(self) -> None:
        batch, self._charges = self._charges, {}
        if len(batch) == 1:  # the usual case unless busy: one EVALSHA, without a pipeline's overhead
            (((tpm_key, budget_key), (tpm, tokens, ttl)),) = batch.items()
            await self._charge(keys=[tpm_key, budget_key], args=[tpm, tokens, ttl])
        elif batch:
            for attempt in (1, 2):
                pipe = self.redis.pipeline(transaction=False)
                for (tpm_key, budget_key), (tpm, tokens, ttl) in batch.items():
                    pipe.evalsha(self._charge.sha, 2, tpm_key, budget_key, tpm, tokens, ttl)
                try:
                    await pipe.execute()
                    return
                except NoScriptError:  # a restarted Redis has no scripts: none of the batch ran
                    if attempt == 2:
                        raise
                    await self.redis.script_load(CHARGE)

    async def _write(self, write: Awaitable[Any]) -> None:
        try:
            await write
        except RedisError as e:
            self.lost(e)

    # ---- load ----------------------------------------------------------------------------------
    def others(self) -> dict[tuple[str, int], float]:
        """The load the other live gateways published last (empty while Redis is away)."""
        return self._others

    async def publish(self) -> None:
        """Publish this gateway's load (expiring unless renewed) and read every other live gateway's."""
        now = time.monotonic()
        elapsed, self._published = max(now - self._published, 1e-3), now
        done, self._done = self._done, Counter()
        held: dict[str, int] = dict(self.gateway._held)
        mine = {"load": [[d, v, x] for (d, v), x in self.gateway.load().items() if x],
                "held": [[slot, n] for slot, n in held.items() if n],
                "rps": [[d, v, round(n / elapsed, 3)] for (d, v), n in done.items()]}
        members_key = self.key("gateways")
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.key("load", self.id), json.dumps(mine), px=int(self.load_ttl_s * 1000))
        pipe.sadd(members_key, self.id)
        pipe.smembers(members_key)
        members = sorted(m for m in (await pipe.execute())[-1] if m != self.id)
        values = await self.redis.mget([self.key("load", m) for m in members]) if members else []
        gone = [m for m, v in zip(members, values, strict=True) if v is None]
        if gone:
            await self.redis.srem(members_key, *gone)
        total: dict[tuple[str, int], float] = {}
        for v in values:
            for d, ver, x in json.loads(v)["load"] if v else []:
                total[(d, int(ver))] = total.get((d, int(ver)), 0.0) + float(x)
        self._others = total
        self.m_gateways.set(1 + len(members) - len(gone))

    # ---- lifecycle and health -----------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._charge_timer is not None:
            self._charge_timer.cancel()
            self._charge_timer = None
        if self.up:
            self._kick()  # pending charges
        await asyncio.gather(*self._writes, return_exceptions=True)
        if self.up:
            try:  # gone at once rather than after its TTL
                await self.redis.delete(self.key("load", self.id))
                await self.redis.srem(self.key("gateways"), self.id)
            except RedisError:
                pass
        await self.redis.aclose()

    async def _loop(self) -> None:
        while True:
            try:
                if self.up:
                    await self.publish()
                else:
                    await self.redis.ping()
                    self.back()
            except RedisError as e:
                self.lost(e)
            except Exception:
                log.exception("publishing the gateway's load to Redis failed")
            await asyncio.sleep(self.publish_s)

    def lost(self, e: Exception) -> None:
        if self.up:
            log.warning("Redis at %s does not answer (%s: %s): limits are judged by this gateway alone, and prefix "
                        "affinity and load stay local, until it is back", safe_redis_url(self.url),
                        type(e).__name__, e)
        self.up = False
        self._others = {}
        self.m_up.set(0)

    def back(self) -> None:
        log.warning("Redis at %s answers again: limits, prefix affinity and load are shared again",
                    safe_redis_url(self.url))
        self.up = True
        self.m_up.set(1)


class FleetLoad:
    """The autoscaler's load signal with shared state: this process's (in flight, held, queued) plus what every
    other live gateway published."""

    def __init__(self, local: LoadSignal, state: RedisState):
        self.local, self.state = local, state

    def load(self) -> dict[tuple[str, int], float]:
        out = dict(self.local.load())
        for k, v in self.state.others().items():
            out[k] = out.get(k, 0.0) + v
        return out


def install_shared(gateway: Gateway, autoscaler: Autoscaler, url: str, prefix: str,
                   registry: CollectorRegistry | None = None) -> RedisState:
    """Share this gateway's limits, prefix affinity and load through Redis at `url`, under `prefix`."""
    state = RedisState(url, prefix, gateway, registry)
    gateway.shared = state
    gateway.router.on_place = state.placed
    gateway.companions.insert(0, state)
    if autoscaler.signal is not None:
        autoscaler.signal = FleetLoad(autoscaler.signal, state)
    log.info("gateway state shared through Redis at %s (prefix %s)", safe_redis_url(url), prefix)
    return state
