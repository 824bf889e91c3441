"""Per-process API state: engines, the replica pool, and short-lived caches."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from psycopg import OperationalError as PgOperationalError
from psycopg_pool import AsyncConnectionPool
from psycopg_pool import PoolTimeout as PgPoolTimeout
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import sessionmaker

from service.api.auth_guard import FailedAuthThrottle
from service.config import Settings
from service.db import hotpath
from service.db import repositories as repo
from service.db.session import make_sync_engine
from service.domain.policy import PolicyStore
from service.domain.trigger import Debounce
from service.engine.discovery import Discovery
from service.engine.replicas import ReplicaPool
from service.intake import ratelimit
from service.intake.batching import Batcher
from service.intake.outbox import Outbox, is_outage
from service.intake.spool import Spool
from service.metrics import FEEDBACK, FEEDBACK_BATCH

# Up to this many ratings per statement, and this many statements out at once per process:
# a lone rating goes at once, a burst waits for the statement out and shares the next one.
# One out at a time measured faster than four (bigger batches; BENCHMARKS.md section 2).
FEEDBACK_BATCH_MAX = 256
FEEDBACK_BATCHES_INFLIGHT = 1


class TTLCache:
    """A tiny dict with per-entry expiry, bounded: past max_entries the least recently used
    entry goes (never the whole cache)."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._data: OrderedDict[Any, tuple[float, Any]] = OrderedDict()

    def get(self, key: Any) -> tuple[bool, Any]:
        hit = self._data.get(key)
        if hit is None or hit[0] < self.clock():
            return False, None
        self._data.move_to_end(key)
        return True, hit[1]

    def stale(self, key: Any) -> tuple[bool, Any]:
        """The last value stored for key, expired or not (until it is evicted)."""
        hit = self._data.get(key)
        return (False, None) if hit is None else (True, hit[1])

    def put(self, key: Any, value: Any, read_at: float | None = None) -> None:
        """Store value, valid for ttl_s from read_at (the clock when its read began;
        default now). Counting from the read's start keeps the TTL a bound on staleness when a
        read is slow, and an entry from a later read is never replaced by one from an earlier
        read that finished after it (two requests missing the cache at once)."""
        expires = (self.clock() if read_at is None else read_at) + self.ttl_s
        held = self._data.get(key)
        if held is not None and held[0] >= expires:
            return
        self._data[key] = (expires, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()


@dataclass
class AppState:
    settings: Settings
    db_url: str
    broker_url: str
    engine: AsyncEngine
    sessions: async_sessionmaker
    fast_pool: AsyncConnectionPool
    pool: ReplicaPool
    discovery: Discovery  # what FLYWHEEL_VLLM_URLS resolves to (the watcher refreshes it)
    redis: Redis
    auth_cache: TTLCache
    route_cache: TTLCache
    policies: PolicyStore
    auth_misses: TTLCache = field(default_factory=lambda: TTLCache(5.0))
    failed_auth: FailedAuthThrottle = field(default_factory=lambda: FailedAuthThrottle(60))
    metrics_db_cache: tuple[float, bytes] | None = None  # (expires at, exposition text)
    background: set[asyncio.Task] = field(default_factory=set)
    _sync_sessions: Any = None
    # Interactions whose answer is being stored after the client got it: read-your-writes for
    # GET /v1/interactions in this process.
    completing: dict[uuid.UUID, asyncio.Task] = field(default_factory=dict)
    # Group commit for ratings and their rate-limit counters (see service.intake.batching).
    feedback_writer: Batcher = field(init=False)
    rate_counter: Batcher = field(init=False)
    # What Postgres could not take, kept on local disk and written back (service.intake.outbox).
    outbox: Outbox = field(init=False)
    # The trigger's debounce: feedback marks its adapter, checked every trigger_debounce_s.
    trigger: Debounce = field(init=False)

    def __post_init__(self) -> None:
        self.feedback_writer = Batcher(
            lambda writes: hotpath.upsert_feedback_many(self.fast_pool, writes),
            max_batch=FEEDBACK_BATCH_MAX, max_inflight=FEEDBACK_BATCHES_INFLIGHT,
            on_batch=FEEDBACK_BATCH.observe,
            shared_failure=lambda exc: isinstance(exc, (PgOperationalError, PgPoolTimeout, OSError)))
        self.rate_counter = ratelimit.window_counter(self.redis)
        spool = Spool(self.settings.spool_dir_for(self.db_url),
                      max_bytes=self.settings.spool_max_mb * 1024 * 1024)
        self.outbox = Outbox(spool, self.fast_pool, on_feedback=self._feedback_replayed)
        # Adapters stay marked while Postgres is down, until it answers the spool's probe again.
        self.trigger = Debounce(self.sessions, self.policies, self.broker_url,
                                self.settings.trigger_debounce_s,
                                paused=lambda: self.outbox.db_down)

    def _feedback_replayed(self, row: Any, write: hotpath.FeedbackWrite) -> None:
        FEEDBACK.labels(row.alias or "", write.rating).inc()
        if row.adapter_id is not None:
            self.feedback_arrived(row.adapter_id, row.alias, write.tenant_id)

    def cached_principal(self, key_hash: str) -> repo.Principal | None:
        """A valid key seen within auth_cache_ttl_s, without touching the database."""
        return self.auth_cache.get(key_hash)[1]

    async def _from_db(self, cache: TTLCache, key: Any, load) -> tuple[Any, bool]:
        """(load(session), True); while Postgres is unreachable, (the last value cache held for
        key, False) instead: nothing can revoke a key or promote a version meanwhile, so chats
        go on and land in the spool. The outage is raised when the cache held nothing for key."""
        known, last = cache.stale(key)
        if known and self.outbox.db_down:
            return last, False
        try:
            async with self.sessions() as session:
                return await load(session), True
        except Exception as exc:
            if is_outage(exc):
                self.outbox.note_outage()
                if known:
                    return last, False
            raise

    async def principal(self, key_hash: str) -> repo.Principal | None:
        """The key's principal, or None for an unknown or revoked key. Valid keys and misses
        are cached apart, so misses (a key-guessing flood) never evict valid keys."""
        found, principal = self.auth_cache.get(key_hash)
        if found:
            return principal
        if self.auth_misses.get(key_hash)[0]:
            return None
        read_at = self.auth_cache.clock()
        principal, fresh = await self._from_db(
            self.auth_cache, key_hash, lambda s: repo.principal_for_hash(s, key_hash))
        if not fresh:
            return principal
        (self.auth_cache if principal is not None else self.auth_misses).put(key_hash, principal, read_at)
        return principal

    async def route(self, tenant_id: str, alias: str) -> repo.Route | None:
        """Alias -> route, cached for routing_cache_ttl_s (the bound on following a swap)."""
        key = (tenant_id, alias)
        found, route = self.route_cache.get(key)
        if found:
            return route
        read_at = self.route_cache.clock()
        route, fresh = await self._from_db(self.route_cache, key, lambda s: repo.route_for_alias(
            s, tenant_id, alias, self.settings.base_model_name))
        if not fresh:
            return route
        self.route_cache.put(key, route, read_at)
        return route

    def feedback_arrived(self, adapter_id: uuid.UUID, alias: str, tenant_id: str) -> None:
        """Note new feedback; the trigger checks the adapter within trigger_debounce_s."""
        self.trigger.mark(adapter_id, alias, tenant_id)

    def sync_sessions(self):
        """A sync sessionmaker for engine operations (swap, rollback), made on first use."""
        if self._sync_sessions is None:

            self._sync_sessions = sessionmaker(make_sync_engine(self.db_url), expire_on_commit=False)
        return self._sync_sessions

    def spawn(self, coro) -> asyncio.Task:
        """Run coro in the background, keeping a reference until it finishes (and waiting for
        it at shutdown)."""
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    async def aclose(self) -> None:
        await self.trigger.flush()
        if self.background:
            await asyncio.wait(self.background, timeout=10)
        await self.outbox.aclose()
        await self.fast_pool.close()
        await self.pool.aclose()
        await self.redis.aclose()
        await self.engine.dispose()
