"""One engine operation at a time per alias: a Postgres advisory lock on its own connection.

A crashed holder's lock dies with its connection. Swap, rollback, stage, canary and the
reconciler all take it before touching an alias's versions.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import sessionmaker

from service.engine.errors import SwapInProgress

# Advisory-lock namespace ("FWSW"); the second key is derived from the adapter id.
LOCK_NAMESPACE = 0x46575357


def lock_key(adapter_id: uuid.UUID) -> int:
    """The int4 half of an adapter's advisory-lock key."""
    return int.from_bytes(adapter_id.bytes[:4], "big", signed=True)


class AliasLock:
    """A session-level advisory lock on one adapter, on its own autocommit connection."""

    def __init__(self, engine: Engine, adapter_id: uuid.UUID) -> None:
        self._engine = engine
        self._key = lock_key(adapter_id)
        self._conn: Connection | None = None
        self._held = False
        # A cancelled await can leave a thread still using the connection.
        self._mutex = threading.Lock()

    def try_acquire(self) -> bool:
        """Take the lock if free (blocking DB call: run it in a thread)."""
        with self._mutex:
            if self._conn is None:
                self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._held = bool(self._conn.execute(
                text("SELECT pg_try_advisory_lock(CAST(:ns AS integer), CAST(:key AS integer))"),
                {"ns": LOCK_NAMESPACE, "key": self._key}).scalar())
            return self._held

    def release(self) -> None:
        """Unlock and give the connection back; a failed unlock drops the connection instead."""
        with self._mutex:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                if self._held:
                    conn.execute(text("SELECT pg_advisory_unlock(CAST(:ns AS integer), "
                                      "CAST(:key AS integer))"),
                                 {"ns": LOCK_NAMESPACE, "key": self._key})
            except Exception:  # noqa: BLE001 - a pooled connection must never keep the lock
                conn.invalidate()
            finally:
                self._held = False
                conn.close()


def engine_of(sessions: sessionmaker) -> Engine:
    """The Engine a sessionmaker is bound to."""
    bind = sessions.kw.get("bind")
    if not isinstance(bind, Engine):
        raise TypeError("the sessionmaker must be bound to a sync Engine")
    return bind


async def try_lock(sessions: sessionmaker, adapter_id: uuid.UUID) -> AliasLock | None:
    """The alias's lock if it is free now, else None."""
    lock = AliasLock(engine_of(sessions), adapter_id)
    try:
        if await asyncio.to_thread(lock.try_acquire):
            return lock
    except BaseException:
        await asyncio.shield(asyncio.to_thread(lock.release))
        raise
    await asyncio.to_thread(lock.release)
    return None


@asynccontextmanager
async def alias_locked(sessions: sessionmaker, adapter_id: uuid.UUID, alias: str,
                       wait_s: float) -> AsyncIterator[float]:
    """Hold the alias's lock for the block (yields seconds waited); SwapInProgress after wait_s."""
    lock = AliasLock(engine_of(sessions), adapter_id)
    t0 = time.perf_counter()
    try:
        while not await asyncio.to_thread(lock.try_acquire):
            if time.perf_counter() - t0 >= wait_s:
                raise SwapInProgress(f"a swap is already in progress for alias {alias!r} "
                                     f"(waited {wait_s:.1f}s for it)", "swap_in_progress")
            await asyncio.sleep(0.05)
        yield time.perf_counter() - t0
    finally:
        # Shielded: a cancelled operation must still give the lock back.
        await asyncio.shield(asyncio.to_thread(lock.release))
