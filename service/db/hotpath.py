"""The two statements on the request hot path, on a raw psycopg pool: one round trip each.

SQLAlchemy's async layer costs more than the statements themselves here (measured in
bench/bench_feedback.py), so these bypass it. Everything else uses SQLAlchemy.
"""

from __future__ import annotations

import uuid
from typing import Any

from psycopg.rows import namedtuple_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

_INSERT_INTERACTION = """
INSERT INTO interactions (id, tenant_id, api_key_id, alias, adapter_id, version_id, served_model,
    replica, "user", messages, params, response_text, finish_reason, prompt_tokens,
    completion_tokens, latency_ms, ttft_ms, stream, created_at)
VALUES (%(id)s, %(tenant_id)s, %(api_key_id)s, %(alias)s, %(adapter_id)s, %(version_id)s,
    %(served_model)s, %(replica)s, %(user)s, %(messages)s, %(params)s, %(response_text)s,
    %(finish_reason)s, %(prompt_tokens)s, %(completion_tokens)s, %(latency_ms)s, %(ttft_ms)s,
    %(stream)s, now())
"""

# The interaction must exist and be visible to the caller, else nothing is written.
# A replaced rating draws a new seq, so it counts as new feedback for the trigger.
_UPSERT_FEEDBACK = """
INSERT INTO feedback (id, interaction_id, tenant_id, adapter_id, version_id, rater_id, rating,
                      correction, comment, api_key_id, created_at, updated_at)
SELECT %(id)s, i.id, i.tenant_id, i.adapter_id, i.version_id, %(rater_id)s, %(rating)s,
       %(correction)s, %(comment)s, %(api_key_id)s, now(), now()
FROM interactions i
WHERE i.id = %(interaction_id)s AND i.tenant_id = %(tenant_id)s
  AND (%(owner_key)s::uuid IS NULL OR i.api_key_id = %(owner_key)s::uuid)
ON CONFLICT (interaction_id, rater_id) DO UPDATE
SET rating = EXCLUDED.rating, correction = EXCLUDED.correction, comment = EXCLUDED.comment,
    api_key_id = EXCLUDED.api_key_id, updated_at = now(), seq = nextval('feedback_seq_seq')
RETURNING id, seq, adapter_id, (xmax <> 0) AS replaced, created_at, updated_at,
          (SELECT alias FROM interactions WHERE id = %(interaction_id)s) AS alias
"""


def _strip_nul(value: Any) -> Any:
    """Postgres text and jsonb cannot hold U+0000; keep the rest of what was served."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_strip_nul(v) for v in value]
    if isinstance(value, dict):
        return {k: _strip_nul(v) for k, v in value.items()}
    return value


async def insert_interaction(pool: AsyncConnectionPool, values: dict[str, Any]) -> None:
    """Store one served interaction (autocommit: a single statement is its own transaction)."""
    params = {k: _strip_nul(v) for k, v in values.items()}
    params["messages"] = Jsonb(params["messages"])
    params["params"] = Jsonb(params.get("params") or {})
    async with pool.connection() as conn:
        await conn.execute(_INSERT_INTERACTION, params)


async def upsert_feedback(pool: AsyncConnectionPool, *, interaction_id: uuid.UUID, tenant_id: str,
                          owner_key: uuid.UUID | None, rater_id: str, rating: str,
                          correction: str | None, comment: str | None,
                          api_key_id: uuid.UUID) -> Any | None:
    """Insert or replace the (interaction, rater) rating; None when the interaction is not visible."""
    async with pool.connection() as conn:
        cur = conn.cursor(row_factory=namedtuple_row)
        await cur.execute(_UPSERT_FEEDBACK, {
            "id": uuid.uuid4(), "interaction_id": interaction_id, "tenant_id": tenant_id,
            "owner_key": owner_key, "rater_id": _strip_nul(rater_id), "rating": rating,
            "correction": _strip_nul(correction), "comment": _strip_nul(comment),
            "api_key_id": api_key_id,
        })
        return await cur.fetchone()


def make_pool(sqlalchemy_url: str, *, size: int, timeout_s: float) -> AsyncConnectionPool:
    """An autocommit psycopg pool for the same database as the SQLAlchemy URL (opened later)."""
    from sqlalchemy.engine import make_url

    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    conninfo = url.render_as_string(hide_password=False)
    return AsyncConnectionPool(
        conninfo, min_size=min(4, size), max_size=size, timeout=timeout_s, open=False,
        kwargs={"autocommit": True, "connect_timeout": max(1, int(timeout_s))},
        # A restarted Postgres leaves dead connections: check before handing one out.
        check=AsyncConnectionPool.check_connection,
    )
