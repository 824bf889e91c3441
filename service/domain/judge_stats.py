"""How the AI judge is doing: its ratings apart from the humans', its budget, its sweeps, and how
often it agrees with a human on the same answer (the only measure of whether to trust it)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from service.domain.policy import JudgePolicy


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95% Wilson interval of a proportion k/n (None without data)."""
    if n <= 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def agreement(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Agreement of (judge, human) rating pairs on the same answers: the share that agree, its
    95% interval, and Cohen's kappa (agreement beyond what the two up-rates give by chance;
    None when chance alone explains everything, e.g. both always say up)."""
    pairs = list(pairs)
    n = len(pairs)
    agree = sum(j == h for j, h in pairs)
    out: dict[str, Any] = {"pairs": n, "agree": agree, "rate": agree / n if n else None,
                           "interval": wilson(agree, n), "kappa": None,
                           "judge_up_rate": None, "human_up_rate": None}
    if not n:
        return out
    pj = sum(j == "up" for j, _ in pairs) / n
    ph = sum(h == "up" for _, h in pairs) / n
    out["judge_up_rate"], out["human_up_rate"] = pj, ph
    chance = pj * ph + (1 - pj) * (1 - ph)
    if chance < 1.0:
        out["kappa"] = (agree / n - chance) / (1 - chance)
    return out


_PAIRS = text("""
SELECT j.rating AS judge, h.rating AS human
FROM feedback j JOIN feedback h ON h.interaction_id = j.interaction_id AND h.source = 'human'
WHERE j.adapter_id = :a AND j.source = 'judge'
""")

_RATINGS = text("""
SELECT source, rating, count(*) AS n FROM feedback WHERE adapter_id = :a GROUP BY source, rating
""")

_SWEEPS = text("""
SELECT id, model, mode, attempted, rated, up, down, calibration, skipped, skipped_reasons,
       stopped, started_at, finished_at
FROM judge_sweeps WHERE adapter_id = :a ORDER BY started_at DESC LIMIT :k
""")

# What the hourly budget counts (workers.judge reads it before each sweep).
USED_LAST_HOUR = text("""
SELECT coalesce(sum(attempted), 0) AS attempted FROM judge_sweeps
WHERE adapter_id = :a AND started_at > now() - interval '1 hour'
""")

_SKIPS_DAY = text("""
SELECT r.key AS reason, sum(r.value::int) AS n
FROM judge_sweeps s, jsonb_each_text(s.skipped_reasons) r
WHERE s.adapter_id = :a AND s.started_at > now() - interval '1 day' GROUP BY r.key
""")


def endpoint(url: str | None) -> str | None:
    """The judge's address without credentials, path or query (shown to ops)."""
    if not url:
        return None

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"


async def summary(session: AsyncSession, adapter_id: uuid.UUID, policy: JudgePolicy,
                  sweeps: int = 10) -> dict[str, Any]:
    """The judge's state for one alias (the API's and the ops page's view)."""
    a = {"a": adapter_id}
    ratings: dict[str, dict[str, int]] = {"human": {"up": 0, "down": 0},
                                          "judge": {"up": 0, "down": 0}}
    for r in await session.execute(_RATINGS, a):
        ratings.setdefault(r.source, {"up": 0, "down": 0})[r.rating] = r.n
    pairs = [(r.judge, r.human) for r in await session.execute(_PAIRS, a)]
    used = (await session.execute(USED_LAST_HOUR, a)).scalar() or 0
    rows = (await session.execute(_SWEEPS, {**a, "k": sweeps})).mappings().all()
    skips = {r.reason: int(r.n) for r in await session.execute(_SKIPS_DAY, a)}
    return {
        "enabled": policy.enabled, "model": policy.model, "endpoint": endpoint(policy.url),
        "mode": policy.mode, "budget_per_hour": policy.budget_per_hour,
        "used_last_hour": int(used), "max_share": policy.max_share,
        "calibration_share": policy.calibration_share,
        "counts_toward_trigger": policy.counts_toward_trigger,
        "ratings": ratings, "agreement": agreement(pairs), "skipped_last_day": skips,
        "sweeps": [dict(r) for r in rows],
    }


# Scrape-time series (service.metrics_db): per alias, ratings by source and judge agreement.
METRIC_QUERIES = {
    "feedback_by_source": """
        SELECT a.tenant_id, a.alias, f.source, f.rating, count(*) AS n
        FROM feedback f JOIN adapters a ON a.id = f.adapter_id
        GROUP BY a.tenant_id, a.alias, f.source, f.rating""",
    "judge_agreement": """
        SELECT a.tenant_id, a.alias, count(*) AS pairs, count(*) FILTER (
            WHERE j.rating = h.rating) AS agree
        FROM feedback j JOIN feedback h ON h.interaction_id = j.interaction_id
             AND h.source = 'human'
        JOIN adapters a ON a.id = j.adapter_id
        WHERE j.source = 'judge' GROUP BY a.tenant_id, a.alias""",
    "judge_skips": """
        SELECT a.tenant_id, a.alias, r.key AS reason, sum(r.value::int) AS n
        FROM judge_sweeps s JOIN adapters a ON a.id = s.adapter_id,
             jsonb_each_text(s.skipped_reasons) r
        GROUP BY a.tenant_id, a.alias, r.key""",
}
