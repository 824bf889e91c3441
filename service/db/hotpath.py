"""The two statements on the request hot path, on a raw psycopg pool.

Storing an interaction is one round trip; ratings go in batches (see service.intake.batching), one
statement for every rating that arrived while the previous batch was out.

SQLAlchemy's async layer costs more than the statements themselves here (measured in
bench/bench_feedback.py), so these bypass it. Everything else uses SQLAlchemy.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Any
from weakref import WeakKeyDictionary

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import namedtuple_row
from psycopg.types.json import Json, Jsonb
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.engine import make_url

# ON CONFLICT: a spooled interaction is replayed again after a crash mid-replay.
_INSERT_INTERACTION = """
INSERT INTO interactions (id, tenant_id, api_key_id, alias, adapter_id, version_id, served_model,
    replica, "user", messages, params, response_text, response_tool_calls, finish_reason,
    prompt_tokens, completion_tokens, latency_ms, ttft_ms, stream, created_at)
VALUES (%(id)s, %(tenant_id)s, %(api_key_id)s, %(alias)s, %(adapter_id)s, %(version_id)s,
    %(served_model)s, %(replica)s, %(user)s, %(messages)s, %(params)s, %(response_text)s,
    %(response_tool_calls)s, %(finish_reason)s, %(prompt_tokens)s, %(completion_tokens)s,
    %(latency_ms)s, %(ttft_ms)s, %(stream)s, COALESCE(%(created_at)s::timestamptz, now()))
ON CONFLICT (id) DO NOTHING
"""

# The answer's half of an interaction stored while it was being generated.
_COMPLETE_INTERACTION = """
UPDATE interactions SET replica = %(replica)s, response_text = %(response_text)s,
    response_tool_calls = %(response_tool_calls)s, finish_reason = %(finish_reason)s,
    prompt_tokens = %(prompt_tokens)s, completion_tokens = %(completion_tokens)s,
    latency_ms = %(latency_ms)s, ttft_ms = %(ttft_ms)s
WHERE id = %(id)s
"""
PENDING = "pending"  # finish_reason of an interaction whose answer is not stored yet
RESPONSE_FIELDS = ("replica", "response_text", "response_tool_calls", "finish_reason",
                   "prompt_tokens", "completion_tokens", "latency_ms", "ttft_ms")
_INTERACTION_DEFAULTS = {**dict.fromkeys(RESPONSE_FIELDS), "response_text": "",
                         "finish_reason": PENDING, "created_at": None}

# One statement for a batch of ratings (group commit): each must name an interaction that
# exists and is visible to its caller, else nothing is written for it. A replaced rating draws
# a new seq, so it counts as new feedback for the trigger.
_UPSERT_FEEDBACK = """
INSERT INTO feedback (id, interaction_id, tenant_id, adapter_id, version_id, rater_id, rating,
                      correction, comment, api_key_id, created_at, updated_at)
SELECT b.id, i.id, i.tenant_id, i.adapter_id, i.version_id, b.rater_id, b.rating,
       b.correction, b.comment, b.api_key_id, now(), now()
FROM unnest(%(id)s::uuid[], %(interaction_id)s::uuid[], %(tenant_id)s::text[],
            %(owner_key)s::uuid[], %(rater_id)s::text[], %(rating)s::text[],
            %(correction)s::text[], %(comment)s::text[], %(api_key_id)s::uuid[])
     AS b(id, interaction_id, tenant_id, owner_key, rater_id, rating, correction, comment,
          api_key_id)
JOIN interactions i ON i.id = b.interaction_id AND i.tenant_id = b.tenant_id
                   AND (b.owner_key IS NULL OR i.api_key_id = b.owner_key)
ON CONFLICT (interaction_id, rater_id) DO UPDATE
SET rating = EXCLUDED.rating, correction = EXCLUDED.correction, comment = EXCLUDED.comment,
    api_key_id = EXCLUDED.api_key_id, updated_at = now(), seq = nextval('feedback_seq_seq')
RETURNING id, interaction_id, rater_id, seq, adapter_id, (xmax <> 0) AS replaced, created_at,
          updated_at, (SELECT alias FROM interactions WHERE id = feedback.interaction_id) AS alias
"""
_FEEDBACK_COLUMNS = ("id", "interaction_id", "tenant_id", "owner_key", "rater_id", "rating",
                     "correction", "comment", "api_key_id")


@dataclass(frozen=True)
class FeedbackWrite:
    """One rating to upsert; owner_key limits a product key to its own interactions."""

    interaction_id: uuid.UUID
    tenant_id: str
    owner_key: uuid.UUID | None
    rater_id: str
    rating: str
    correction: str | None
    comment: str | None
    api_key_id: uuid.UUID
    id: uuid.UUID | None = None  # set when the id was already given out (a spooled rating)


def _strip_nul(value: Any) -> Any:
    """Postgres text and jsonb cannot hold U+0000, in values or in keys; keep the rest of what
    was served."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_strip_nul(v) for v in value]
    if isinstance(value, dict):
        return {_strip_nul(k): _strip_nul(v) for k, v in value.items()}
    return value


def _json_or_none(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(value)


async def insert_interaction(pool: AsyncConnectionPool, values: dict[str, Any]) -> None:
    """Store one interaction, with its answer or (absent answer fields) as pending; a row with
    its id already stored is left alone (autocommit: one statement is its own transaction)."""
    params = {**_INTERACTION_DEFAULTS, **{k: _strip_nul(v) for k, v in values.items()}}
    params["messages"] = Jsonb(params["messages"])
    params["params"] = Json(params.get("params") or {})  # a json column: kept as sent
    params["response_tool_calls"] = _json_or_none(params["response_tool_calls"])
    async with pool.connection() as conn:
        await conn.execute(_INSERT_INTERACTION, params)


async def complete_interaction(pool: AsyncConnectionPool, iid: uuid.UUID,
                               fields: dict[str, Any]) -> None:
    """Store the answer of an interaction inserted as pending."""
    params = {**dict.fromkeys(RESPONSE_FIELDS), **{k: _strip_nul(v) for k, v in fields.items()},
              "id": iid}
    params["response_tool_calls"] = _json_or_none(params["response_tool_calls"])
    async with pool.connection() as conn:
        await conn.execute(_COMPLETE_INTERACTION, params)


async def delete_unanswered(pool: AsyncConnectionPool, iid: uuid.UUID) -> None:
    """Remove a pending interaction that was never answered (the engine refused or failed)."""
    async with pool.connection() as conn:
        await conn.execute("DELETE FROM interactions WHERE id = %s AND finish_reason = %s",
                           (iid, PENDING))


def _rounds(writes: list[FeedbackWrite]) -> list[list[int]]:
    """Indexes of the writes split so no (interaction, rater) repeats within a statement
    (Postgres refuses to update a row twice in one); later posts land in later rounds."""
    rounds: list[list[int]] = []
    seen: dict[tuple[uuid.UUID, str], int] = {}
    for n, w in enumerate(writes):
        key = (w.interaction_id, w.rater_id)
        r = seen[key] = seen.get(key, -1) + 1
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(n)
    return rounds


async def _upsert(conn: AsyncConnection, writes: list[FeedbackWrite]) -> list[Any | None]:
    params: dict[str, list] = {c: [] for c in _FEEDBACK_COLUMNS}
    for w in writes:
        params["id"].append(w.id or uuid.uuid4())
        params["interaction_id"].append(w.interaction_id)
        params["tenant_id"].append(w.tenant_id)
        params["owner_key"].append(w.owner_key)
        params["rater_id"].append(w.rater_id)
        params["rating"].append(w.rating)
        params["correction"].append(w.correction)
        params["comment"].append(w.comment)
        params["api_key_id"].append(w.api_key_id)
    cur = conn.cursor(row_factory=namedtuple_row)
    await cur.execute(_UPSERT_FEEDBACK, params)
    rows: list[Any] = await cur.fetchall()  # namedtuples with the RETURNING clause's fields
    found = {(r.interaction_id, r.rater_id): r for r in rows}
    return [found.get((w.interaction_id, w.rater_id)) for w in writes]


async def upsert_feedback_many(pool: AsyncConnectionPool, writes: list[FeedbackWrite]
                               ) -> list[Any | BaseException | None]:
    """Insert or replace each (interaction, rater) rating, in as few statements as the batch
    allows. Per write: the stored row, None when the interaction is not visible to the caller,
    or the error that write alone caused (a batch that fails on its data is retried one by one,
    so one bad rating fails only its own request). Lost connections raise for the whole batch."""
    # Stored as Postgres can hold them, so the rounds key raters as the unique index sees them.
    writes = [replace(w, rater_id=_strip_nul(w.rater_id), correction=_strip_nul(w.correction),
                      comment=_strip_nul(w.comment)) for w in writes]
    out: list[Any | BaseException | None] = [None] * len(writes)
    async with pool.connection() as conn:
        for idx in _rounds(writes):
            part = [writes[n] for n in idx]
            try:
                rows: list[Any] = await _upsert(conn, part)
            except psycopg.OperationalError:
                raise
            except psycopg.Error as exc:
                if len(part) == 1:
                    rows = [exc]
                else:
                    rows = [await _upsert_alone(conn, w) for w in part]
            for n, row in zip(idx, rows, strict=True):
                out[n] = row
    return out


async def _upsert_alone(conn: AsyncConnection, write: FeedbackWrite) -> Any | BaseException | None:
    try:
        return (await _upsert(conn, [write]))[0]
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        return exc


# A connection back in the pool less than this long ago is handed out unchecked: under load
# that saves a round trip per request, and after a Postgres restart (which takes longer than
# this) every connection is idle long enough to be checked first.
FRESH_S = 1.0
_returned_at: WeakKeyDictionary[AsyncConnection, float] = WeakKeyDictionary()


async def _note_return(conn: AsyncConnection) -> None:
    _returned_at[conn] = time.monotonic()


async def _check_unless_fresh(conn: AsyncConnection) -> None:
    returned = _returned_at.get(conn)
    if returned is None or time.monotonic() - returned > FRESH_S:
        await AsyncConnectionPool.check_connection(conn)


def make_pool(sqlalchemy_url: str, *, size: int, timeout_s: float) -> AsyncConnectionPool:
    """An autocommit psycopg pool for the same database as the SQLAlchemy URL (opened later)."""

    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    conninfo = url.render_as_string(hide_password=False)
    return AsyncConnectionPool(
        conninfo, min_size=min(4, size), max_size=size, timeout=timeout_s, open=False,
        kwargs={"autocommit": True, "connect_timeout": max(1, int(timeout_s))},
        # A restarted Postgres leaves dead connections: check those that sat idle.
        check=_check_unless_fresh, reset=_note_return,
    )
