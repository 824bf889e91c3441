"""Engines and sessions: async for the API, sync for workers, CLI and migrations."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")


def _connect_args(timeout_s: float) -> dict:
    return {"connect_timeout": max(1, int(timeout_s))}


def make_async_engine(url: str, *, pool_size: int = 20, max_overflow: int = 20,
                      connect_timeout_s: float = 3.0) -> AsyncEngine:
    """Async engine (psycopg 3). pool_pre_ping so a restarted Postgres is recovered from."""
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=True,
        pool_timeout=connect_timeout_s, connect_args=_connect_args(connect_timeout_s),
    )


def make_async_sessionmaker(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)


def make_sync_engine(url: str, *, connect_timeout_s: float = 3.0, pool_size: int = 5) -> Engine:
    """Sync engine for workers, CLI and Alembic."""
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size,
                         connect_args=_connect_args(connect_timeout_s))


@contextmanager
def session_scope(factory: sessionmaker) -> Iterator[Session]:
    """A transaction: commit on success, roll back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


async def db_call(sessions: sessionmaker, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run fn(session, ...) in one transaction on a worker thread."""
    def run() -> T:
        with session_scope(sessions) as session:
            return fn(session, *args, **kwargs)
    return await asyncio.to_thread(run)
