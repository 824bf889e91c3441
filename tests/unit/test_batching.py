"""service.intake.batching.Batcher on a plain event loop, with a fake runner recording batches."""

from __future__ import annotations

import asyncio

import pytest

from service.intake.batching import Batcher


class Recorder:
    def __init__(self, delay: float = 0.01, fail: set | None = None, crash: bool = False):
        self.batches: list[list] = []
        self.delay, self.fail, self.crash = delay, fail or set(), crash

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        await asyncio.sleep(self.delay)
        if self.crash:
            raise ConnectionError("database went away")
        return [ValueError(f"bad {i}") if i in self.fail else i * 10 for i in items]


async def test_a_lone_call_goes_at_once_and_a_burst_shares_the_next_batch():
    run = Recorder()
    b = Batcher(run, max_batch=100, max_inflight=1)
    assert await b.submit(1) == 10
    assert run.batches == [[1]]
    results = await asyncio.gather(*(b.submit(i) for i in range(2, 12)))
    assert results == [i * 10 for i in range(2, 12)]
    # The first of the burst went alone; the rest queued behind it and went together.
    assert run.batches[1:] == [[2], list(range(3, 12))]
    assert (b.batches, b.items) == (3, 11)


async def test_batches_respect_max_batch_and_max_inflight():
    run = Recorder()
    b = Batcher(run, max_batch=3, max_inflight=2)
    assert await asyncio.gather(*(b.submit(i) for i in range(10))) == [i * 10 for i in range(10)]
    assert max(len(x) for x in run.batches) == 3
    assert [i for x in run.batches for i in x] == list(range(10))  # arrival order kept


async def test_an_item_error_fails_only_its_caller():
    b = Batcher(Recorder(fail={3}), max_inflight=1)
    results = await asyncio.gather(*(b.submit(i) for i in range(6)), return_exceptions=True)
    assert isinstance(results[3], ValueError) and str(results[3]) == "bad 3"
    assert [r for n, r in enumerate(results) if n != 3] == [0, 10, 20, 40, 50]


async def test_a_failed_batch_fails_every_caller_in_it_and_the_next_batch_still_runs():
    run = Recorder(crash=True)
    b = Batcher(run, max_inflight=1)
    results = await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    run.crash = False
    assert await b.submit(7) == 70


async def test_a_cancelled_caller_does_not_cancel_the_batch_for_the_others():
    run = Recorder(delay=0.05)
    b = Batcher(run, max_inflight=1)
    first = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0)
    queued = [asyncio.ensure_future(b.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    queued[0].cancel()
    assert await first == 10 and await queued[1] == 30
    with pytest.raises(asyncio.CancelledError):
        await queued[0]
    assert run.batches == [[1], [2, 3]]  # the cancelled caller's item was still written


async def test_a_runner_returning_the_wrong_number_of_results_is_an_error_for_all():
    async def short(items):
        return items[:-1]

    b = Batcher(short, max_inflight=1)
    results = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_an_item_that_fails_the_whole_batch_fails_only_its_own_caller():
    """A runner that raises for the whole batch because of one item (a value the database or
    Redis cannot encode): the batch is re-run item by item, so only that caller sees the error."""
    batches: list[list] = []

    async def run(items: list) -> list:
        batches.append(list(items))
        await asyncio.sleep(0.01)
        if 3 in items:
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return [i * 10 for i in items]

    b = Batcher(run, max_inflight=1)
    results = await asyncio.gather(*(b.submit(i) for i in range(6)), return_exceptions=True)
    assert isinstance(results[3], UnicodeEncodeError)
    assert [r for n, r in enumerate(results) if n != 3] == [0, 10, 20, 40, 50]
    assert [3] in batches and len(batches) > 2


async def test_an_outage_fails_the_batch_at_once_without_retrying_each_item():
    run = Recorder(crash=True)
    b = Batcher(run, max_inflight=1)
    results = await asyncio.gather(*(b.submit(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert len(run.batches) == 2  # the lone first call and the rest together, no item retries
