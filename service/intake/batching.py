"""Coalescing concurrent calls into batches (group commit), for the feedback hot path.

No timer: a lone call goes out at once. While `max_inflight` batches are out, new calls queue,
and the next batch takes all of them (up to `max_batch`). Under load, one round trip then serves
dozens of requests, which is what lets a Python HTTP route keep up with Postgres and Redis.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# The runner returns one entry per item: a result, or the exception that item alone raises.
Runner = Callable[[list[T]], Awaitable[Sequence["R | BaseException"]]]


def _outage(exc: BaseException) -> bool:
    return isinstance(exc, (OSError, TimeoutError))  # ConnectionError is an OSError


class Batcher(Generic[T, R]):
    """Runs `run(items)` on batches of submitted items; each submitter gets its own entry."""

    def __init__(self, run: Runner, *, max_batch: int = 256, max_inflight: int = 2,
                 on_batch: Callable[[int], None] | None = None,
                 shared_failure: Callable[[BaseException], bool] | None = None) -> None:
        self._run = run
        # An exception that is not a shared failure (an outage) may come from one item alone:
        # the batch is then re-run item by item, so a bad item fails only its own caller.
        self._shared_failure = shared_failure or _outage
        self._on_batch = on_batch
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._pending: deque[tuple[T, asyncio.Future]] = deque()
        self._inflight: set[asyncio.Task] = set()
        self.batches = 0  # for tests and benchmarks: how many round trips served the calls
        self.items = 0

    async def submit(self, item: T) -> R:
        """Queue the item and wait for its result (or its exception)."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._dispatch()
        # A cancelled caller (client gone) does not cancel the batch: the others still need it.
        return await future

    def _dispatch(self) -> None:
        while self._pending and len(self._inflight) < self._max_inflight:
            n = min(len(self._pending), self._max_batch)
            batch = [self._pending.popleft() for _ in range(n)]
            task = asyncio.ensure_future(self._run_batch(batch))
            self._inflight.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._inflight.discard(task)
        self._dispatch()

    async def _run_batch(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        self.batches += 1
        self.items += len(batch)
        if self._on_batch is not None:
            self._on_batch(len(batch))
        try:
            results = await self._run([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch runner returned {len(results)} results for "
                                   f"{len(batch)} items")
        except Exception as exc:  # noqa: BLE001 - handed to the callers it belongs to
            if len(batch) > 1 and not self._shared_failure(exc):
                for one in batch:
                    await self._run_batch([one])
                return
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException as exc:  # cancelled or exiting: every caller learns it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            raise
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
