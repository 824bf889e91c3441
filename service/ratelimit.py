"""Feedback rate limits per tenant and per rater: fixed one-minute windows in Redis.

Shared by every API process. When Redis is unreachable the limiter lets feedback through
(counted in a metric): losing ratings during a broker outage is worse than a brief flood, and
the dataset's per-rater cap still bounds any one rater's share of a training set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

RATE_LIMITED = Counter("flywheel_feedback_rate_limited_total", "Feedback refused by a rate limit",
                       ["scope"])
LIMITER_UNAVAILABLE = Counter("flywheel_rate_limiter_unavailable_total",
                              "Feedback let through because Redis was unreachable")


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    scope: str | None = None  # "tenant" | "rater"
    limit: int = 0
    retry_after_s: int = 0


async def check_feedback(redis: Redis, tenant_id: str, rater_id: str, *, per_tenant: int,
                         per_rater: int, now: float | None = None) -> Verdict:
    """Count this feedback in the current minute; refuse it if either window is full."""
    now = time.time() if now is None else now
    window = int(now // 60)
    retry = max(1, 60 - int(now % 60))
    tenant_key = f"fw:rl:t:{tenant_id}:{window}"
    rater_key = f"fw:rl:r:{tenant_id}:{rater_id}:{window}"
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.incr(tenant_key)
            pipe.expire(tenant_key, 120)
            pipe.incr(rater_key)
            pipe.expire(rater_key, 120)
            tenant_n, _, rater_n, _ = await pipe.execute()
    except (RedisError, OSError):
        LIMITER_UNAVAILABLE.inc()
        return Verdict(True)
    if per_rater and rater_n > per_rater:
        RATE_LIMITED.labels("rater").inc()
        return Verdict(False, "rater", per_rater, retry)
    if per_tenant and tenant_n > per_tenant:
        RATE_LIMITED.labels("tenant").inc()
        return Verdict(False, "tenant", per_tenant, retry)
    return Verdict(True)
