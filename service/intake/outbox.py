"""What Postgres could not take, kept in the local spool and written back in order.

Three kinds of record: a whole `interaction` (its insert failed), the `response` of an
interaction stored while it was being generated (its update failed), and `feedback` on an
interaction still in the spool. Replay is idempotent (an interaction's insert skips an id
already stored; a rating is an upsert), so a crash between writing records back and clearing
them only writes them again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy.exc import OperationalError as SaOperationalError
from sqlalchemy.exc import TimeoutError as SaPoolTimeout

from service.db import hotpath
from service.intake.batching import Batcher
from service.intake.spool import Spool, SpoolUnavailable
from service.metrics import SPOOL_REJECTED, SPOOL_REPLAYED, SPOOLED

log = logging.getLogger(__name__)

_UUID_VALUES = ("id", "api_key_id", "adapter_id", "version_id")
_UUID_FEEDBACK = ("interaction_id", "owner_key", "api_key_id", "id")


def is_outage(exc: BaseException) -> bool:
    """Postgres is unreachable (as opposed to refusing this one write), through psycopg or
    SQLAlchemy."""
    return isinstance(exc, (psycopg.OperationalError, PoolTimeout, SaOperationalError,
                            SaPoolTimeout, OSError))


class KnownOutage(ConnectionError):
    """Not tried: Postgres failed moments ago and has not answered a probe since."""


@dataclass(frozen=True)
class Held:
    """An interaction in the spool, with what checking feedback on it needs."""

    tenant_id: str
    api_key_id: uuid.UUID | None


def _uuids(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {**d, **{k: uuid.UUID(d[k]) for k in keys if d.get(k) is not None}}


@dataclass
class Outbox:
    """The spool plus its index of held interactions and its replay into Postgres."""

    spool: Spool
    pool: AsyncConnectionPool
    # Called with (stored row, the write) for each rating written back.
    on_feedback: Callable[[Any, hotpath.FeedbackWrite], None] = lambda row, write: None
    _held: dict[uuid.UUID, Held] = field(default_factory=dict)
    _held_in: dict[str, set[uuid.UUID]] = field(default_factory=dict)  # spool file -> ids
    _replayed: dict[str, int] = field(default_factory=dict)  # spool file -> records written back
    _writer: Batcher = field(init=False)
    _replay_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Set on an outage, cleared when the replay loop reaches Postgres again: meanwhile writes
    # go straight to the spool instead of each waiting for a connection that will not come.
    db_down: bool = False

    def __post_init__(self) -> None:
        # Group commit: appends that arrive while one fsync is out share the next.
        self._writer = Batcher(lambda records: asyncio.to_thread(self.spool.append_many, records),
                               max_batch=256, max_inflight=1,
                               shared_failure=lambda exc: isinstance(exc, SpoolUnavailable))

    def open(self) -> None:
        """Open this process's spool file and index the records of adopted orphans."""
        self.spool.open()
        self._index_orphans()

    def _index_orphans(self) -> None:
        for f, records, _ in self.spool.pending():
            for record in records:
                self._note(f.path.name, record)

    def _note(self, file: str, record: dict[str, Any]) -> None:
        if record["kind"] != "interaction":
            return
        values = record["values"]  # as spooled (UUIDs) or as read back (their strings)
        iid = uuid.UUID(str(values["id"]))
        key = values.get("api_key_id")
        self._held[iid] = Held(values["tenant_id"], uuid.UUID(str(key)) if key else None)
        self._held_in.setdefault(file, set()).add(iid)

    def note_outage(self) -> None:
        """Postgres was just found unreachable."""
        if not self.db_down:
            log.warning("Postgres unreachable: interactions go to the spool until it answers")
        self.db_down = True

    def _note_reachable(self) -> None:
        if self.db_down:
            log.warning("Postgres answers again: writing the spool back")
        self.db_down = False

    async def probe(self) -> bool:
        """Whether Postgres answers a trivial query now (clears db_down if so)."""
        try:
            async with self.pool.connection() as conn:
                await conn.execute("SELECT 1")
        except Exception as exc:  # noqa: BLE001 - any failure means "still down"
            if is_outage(exc):
                return False
            raise
        self._note_reachable()
        return True

    @property
    def depth(self) -> int:
        """Records waiting to be written back."""
        return self.spool.depth

    def held(self, iid: uuid.UUID) -> Held | None:
        """The spooled interaction with this id, if it is still in the spool."""
        return self._held.get(iid)

    async def _append(self, record: dict[str, Any]) -> None:
        await self._writer.submit(record)
        own = self.spool.own_name
        self._note(own, record)
        SPOOLED.labels(record["kind"]).inc()

    async def add_interaction(self, values: dict[str, Any]) -> None:
        """Spool a whole interaction; raises SpoolFull or SpoolUnavailable if it cannot."""
        await self._append({"kind": "interaction", "values": values})

    async def add_response(self, iid: uuid.UUID, fields: dict[str, Any]) -> None:
        """Spool the answer of an interaction stored as pending."""
        await self._append({"kind": "response", "id": iid, "fields": fields})

    async def add_feedback(self, write: hotpath.FeedbackWrite) -> None:
        """Spool a rating of a spooled interaction (it is written after the interaction)."""
        await self._append({"kind": "feedback", "write": asdict(write)})

    async def replay_once(self) -> int:
        """Write held records back to Postgres in order, oldest file first; returns how many
        were written. Stops at the first outage (the rest waits for the next round)."""
        async with self._replay_lock:
            written = 0
            for f, records, end in list(self.spool.pending()):
                name = f.path.name
                done = self._replayed.get(name, 0)
                for record in records[done:]:
                    try:
                        await self._write_back(record)
                        self._note_reachable()
                    except Exception as exc:
                        if is_outage(exc):
                            self.note_outage()
                            return written
                        self._reject(name, record, exc)
                    done += 1
                    self._replayed[name] = done
                    written += 1
                if self.spool.clear(f, end):
                    self._replayed.pop(name, None)
                    for iid in self._held_in.pop(name, set()):
                        self._held.pop(iid, None)
            return written

    async def _write_back(self, record: dict[str, Any]) -> None:
        kind = record["kind"]
        if kind == "interaction":
            await hotpath.insert_interaction(self.pool, _uuids(record["values"], _UUID_VALUES))
        elif kind == "response":
            await hotpath.complete_interaction(self.pool, uuid.UUID(record["id"]), record["fields"])
        elif kind == "feedback":
            write = hotpath.FeedbackWrite(**_uuids(record["write"], _UUID_FEEDBACK))
            (row,) = await hotpath.upsert_feedback_many(self.pool, [write])
            if isinstance(row, BaseException):
                raise row
            if row is None:
                raise LookupError(f"interaction {write.interaction_id} is not stored")
            self.on_feedback(row, write)
        else:
            raise ValueError(f"unknown spool record kind {kind!r}")
        SPOOL_REPLAYED.labels(kind).inc()

    def _reject(self, file: str, record: dict[str, Any], exc: BaseException) -> None:
        """Set a record Postgres refuses aside (it would block the spool forever)."""
        SPOOL_REJECTED.labels(record["kind"]).inc()
        folder = self.spool.directory / "rejected"
        folder.mkdir(exist_ok=True)
        # Private like the spool itself: records hold what users wrote.
        fd = os.open(folder / f"{file}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as out:
            out.write(json.dumps({"error": type(exc).__name__, "record": record}, default=str,
                                 ensure_ascii=False) + "\n")
        # No contents in logs (they may hold PII): the kind, the id and the error class.
        ident = record.get("id") or record.get("values", {}).get("id") or \
            record.get("write", {}).get("interaction_id")
        log.error("spooled %s %s refused by Postgres (%s); set aside in %s", record["kind"],
                  ident, type(exc).__name__, folder)

    async def run(self, interval_s: float) -> None:
        """Background task: write back whatever the spool holds, every interval_s."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                if self.spool.adopt_orphans():
                    self._index_orphans()
                if self.spool.depth:
                    await self.replay_once()
                elif self.db_down:
                    await self.probe()
            except Exception as exc:  # noqa: BLE001 - retried next round
                log.warning("spool replay failed: %s", type(exc).__name__)

    async def aclose(self) -> None:
        """One last write-back, then release the spool (what is left waits for the next start)."""
        try:
            await asyncio.wait_for(self.replay_once(), 10)
        except Exception as exc:  # noqa: BLE001 - the records stay in the spool
            log.warning("spool replay at shutdown failed: %s", type(exc).__name__)
        self.spool.close()
