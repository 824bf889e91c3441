"""What the API reads about aliases: an alias by name, its versions and their names, the
newest versions per alias, ratings per version and the thumbs-up series over time."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import Adapter, AdapterVersion

# (version id, source, rating) -> how many; source is "human" or "judge", rating "up" or "down".
RatingCounts = dict[tuple[Any, str, str], int]


async def adapter_for_alias(session: AsyncSession, tenant_id: str, alias: str) -> Adapter | None:
    """The tenant's adapter with this alias, or None."""
    return (await session.scalars(select(Adapter).where(
        Adapter.tenant_id == tenant_id, Adapter.alias == alias))).first()


async def tenant_adapters(session: AsyncSession, tenant_id: str) -> Sequence[Adapter]:
    """The tenant's adapters, by alias."""
    return (await session.scalars(select(Adapter).where(Adapter.tenant_id == tenant_id)
                                  .order_by(Adapter.alias))).all()


async def versions_of(session: AsyncSession, adapter_id: uuid.UUID) -> Sequence[AdapterVersion]:
    """Every version of an adapter, oldest first."""
    return (await session.scalars(select(AdapterVersion).where(
        AdapterVersion.adapter_id == adapter_id).order_by(AdapterVersion.number))).all()


async def version_names(session: AsyncSession, ids: Iterable[uuid.UUID | None]
                        ) -> dict[uuid.UUID, str]:
    """lora_name per version id (None ids are skipped)."""
    wanted = {i for i in ids if i is not None}
    if not wanted:
        return {}
    return dict((await session.execute(select(AdapterVersion.id, AdapterVersion.lora_name)
                                       .where(AdapterVersion.id.in_(wanted)))).all())


async def recent_versions(session: AsyncSession, adapter_ids: list[uuid.UUID], k: int) -> list:
    """Each adapter's newest k versions, newest first, as rows of (adapter_id, id, number,
    lora_name, status, total) where total is the adapter's version count. One query."""
    if not adapter_ids:
        return []
    return list((await session.execute(text("""
        SELECT adapter_id, id, number, lora_name, status, total FROM (
            SELECT adapter_id, id, number, lora_name, status,
                   row_number() OVER (PARTITION BY adapter_id ORDER BY number DESC) AS rank,
                   count(*) OVER (PARTITION BY adapter_id) AS total
            FROM adapter_versions WHERE adapter_id = ANY(:adapters)) v
        WHERE rank <= :k ORDER BY adapter_id, number DESC"""),
        {"adapters": adapter_ids, "k": k})).all())


async def rating_counts(session: AsyncSession, adapter_ids: list[uuid.UUID],
                        version_ids: list[uuid.UUID] | None = None) -> RatingCounts:
    """The adapters' feedback counted per (version, source, rating); version_ids narrows it.

    adapter_id narrows the scan to ix_feedback_adapter_seq; version_id has no index."""
    if version_ids is None:
        sql = ("SELECT version_id, source, rating, count(*) AS n FROM feedback "
               "WHERE adapter_id = ANY(:adapters) GROUP BY version_id, source, rating")
        params: dict[str, Any] = {"adapters": adapter_ids}
    else:
        sql = ("SELECT version_id, source, rating, count(*) AS n FROM feedback "
               "WHERE adapter_id = ANY(:adapters) AND version_id = ANY(:ids) "
               "GROUP BY version_id, source, rating")
        params = {"adapters": adapter_ids, "ids": version_ids}
    return {(r.version_id, r.source, r.rating): r.n
            for r in await session.execute(text(sql), params)}


async def rating_series(session: AsyncSession, adapter_id: uuid.UUID, *, bucket_minutes: int,
                        hours: int, base_name: str) -> list:
    """Thumbs-up per time bucket and version over the last hours, oldest first, as rows of
    (version, bucket, up, n): the judge's ratings are one series ("judge"), ratings of base-model
    answers are base_name's, imported ones their source's."""
    return list(await session.execute(text("""
        SELECT CASE WHEN f.source = 'judge' THEN 'judge'
                    ELSE coalesce(v.lora_name, i.served_model, :base) END AS version,
               to_timestamp(floor(extract(epoch FROM f.created_at) / (:b * 60)) * (:b * 60)) AS bucket,
               count(*) FILTER (WHERE f.rating = 'up') AS up, count(*) AS n
        FROM feedback f LEFT JOIN adapter_versions v ON v.id = f.version_id
        -- Imported ratings are their own series ("import:<source>"), not the base model's;
        -- the AI judge's ratings are one series ("judge"), apart from every version's.
        LEFT JOIN interactions i ON i.id = f.interaction_id AND i.source IS NOT NULL
        WHERE f.adapter_id = :a AND f.created_at > now() - make_interval(hours => :h)
        GROUP BY 1, 2 ORDER BY 2"""), {"a": adapter_id, "b": bucket_minutes, "h": hours,
                                         "base": base_name}))
