"""Feedback rate limits per tenant and per rater: fixed one-minute windows in Redis.

Shared by every API process. When Redis is unreachable the limiter lets feedback through
(counted in a metric): losing ratings during a broker outage is worse than a brief flood, and
the dataset's per-rater cap still bounds any one rater's share of a training set.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter as Tally
from dataclasses import dataclass

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.intake.batching import Batcher

RATE_LIMITED = Counter("flywheel_feedback_rate_limited_total", "Feedback refused by a rate limit",
                       ["scope"])
LIMITER_UNAVAILABLE = Counter("flywheel_rate_limiter_unavailable_total",
                              "Feedback let through because Redis was unreachable")


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    scope: str | None = None  # "tenant" | "key" | "rater"
    limit: int = 0
    retry_after_s: int = 0


def window_counter(redis: Redis) -> Batcher[tuple[str, ...], list[int]]:
    """Counts one hit on each of a call's keys, for many concurrent calls in one pipeline.

    Each call gets the counts it would have got from its own INCRs in arrival order, so the
    limits stay exact across API processes; only the round trips are shared.
    """

    async def run(calls: list[tuple[str, ...]]) -> list[list[int]]:
        hits = Tally(k for keys in calls for k in keys)
        async with redis.pipeline(transaction=False) as pipe:
            for key, n in hits.items():
                pipe.incrby(key, n)
                pipe.expire(key, 120)
            replies = await pipe.execute()
        seen = {key: replies[2 * i] - n for i, (key, n) in enumerate(hits.items())}
        out = []
        for keys in calls:
            counts = []
            for key in keys:
                seen[key] += 1
                counts.append(seen[key])
            out.append(counts)
        return out

    return Batcher(run, max_batch=512, max_inflight=1,
                   # OSError covers ConnectionError and TimeoutError; Redis has its own.
                   shared_failure=lambda exc: isinstance(exc, (OSError, RedisConnectionError,
                                                               RedisTimeoutError)))


def key_part(*ids: str) -> str:
    """A Redis key segment for these ids: unambiguous whatever they contain (tenant "X" with
    rater "x:v" never meets tenant "X:x" with rater "v") and always encodable (a digest of
    the length-prefixed ids; surrogates pass through instead of failing the batch)."""
    raw = "".join(f"{len(i)}:{i}" for i in ids).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


async def check_feedback(counter: Batcher[tuple[str, ...], list[int]], tenant_id: str,
                         rater_id: str, *, per_tenant: int, per_rater: int, key_id: str = "",
                         per_key: int = 0, now: float | None = None) -> Verdict:
    """Count this feedback in the current minute; refuse it if any window is full. A rater is
    namespaced by the key that posts it (two keys' "alice" are two raters), and the key itself
    has its own window: a key inventing rater ids still meets `per_key`."""
    now = time.time() if now is None else now
    window = int(now // 60)
    retry = max(1, 60 - int(now % 60))
    tenant_key = f"fw:rl:t:{key_part(tenant_id)}:{window}"
    rater_key = f"fw:rl:r:{key_part(tenant_id, key_id, rater_id)}:{window}"
    api_key = f"fw:rl:k:{key_part(tenant_id, key_id)}:{window}"
    try:
        tenant_n, rater_n, key_n = await counter.submit((tenant_key, rater_key, api_key))
    except (RedisError, OSError):
        LIMITER_UNAVAILABLE.inc()
        return Verdict(True)
    if per_rater and rater_n > per_rater:
        RATE_LIMITED.labels("rater").inc()
        return Verdict(False, "rater", per_rater, retry)
    if per_key and key_n > per_key:
        RATE_LIMITED.labels("key").inc()
        return Verdict(False, "key", per_key, retry)
    if per_tenant and tenant_n > per_tenant:
        RATE_LIMITED.labels("tenant").inc()
        return Verdict(False, "tenant", per_tenant, retry)
    return Verdict(True)
