"""Feedback ingestion: POST /v1/feedback at 32 concurrent clients vs a raw single-row insert.

Run:  python -m bench.bench_feedback [--requests 4000] [--seconds 10] [--concurrency 32]
Needs wrk (apt-get install -y wrk) for the HTTP side.

Both sides run in this one process against the same embedded Postgres in the same run: the
baseline is psycopg's async single-row INSERT (one statement, 32 pooled connections, driven
from Python); Flywheel's side is the full HTTP route (auth, validation, upsert, trigger mark),
driven by wrk at the same concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from psycopg_pool import AsyncConnectionPool

from bench._stack import BenchStack, save, summarize
from bench._wrk import require_wrk, run_wrk
from service.db import repositories as repo
from service.db.session import session_scope
from tests.helpers.data import seed_interactions


async def _run(concurrency: int, n: int, one) -> dict:
    latencies: list[float] = []
    queue = iter(range(n))

    async def client() -> None:
        for i in queue:
            t = time.perf_counter()
            await one(i)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return summarize(latencies, time.perf_counter() - start)


async def baseline(db_url: str, concurrency: int, n: int) -> dict:
    raw = db_url.replace("postgresql+psycopg://", "postgresql://")
    async with AsyncConnectionPool(raw, min_size=concurrency, max_size=concurrency, open=False) as pool:
        await pool.open(wait=True)
        async with pool.connection() as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS bench_raw "
                               "(id uuid PRIMARY KEY, interaction_id uuid, rating text, "
                               "created_at timestamptz DEFAULT now())")

        async def one(i: int) -> None:
            async with pool.connection() as conn:
                await conn.execute("INSERT INTO bench_raw (id, interaction_id, rating) VALUES (%s, %s, %s)",
                                   (uuid.uuid4(), uuid.uuid4(), "up"))

        await _run(concurrency, min(n, 200), one)  # warm-up
        return await _run(concurrency, n, one)


def flywheel(api_url: str, key: str, ids: list[str], concurrency: int, seconds: int) -> dict:
    bodies = [{"interaction_id": iid, "rating": "up" if n % 2 else "down", "rater_id": f"r{n}"}
              for n, iid in enumerate(ids)]
    headers = {"Authorization": f"Bearer {key}"}
    run_wrk(api_url, bodies=bodies[:50], path="/v1/feedback", headers=headers,
            connections=concurrency, seconds=2)  # warm-up
    return run_wrk(api_url, bodies=bodies, path="/v1/feedback", headers=headers,
                   connections=concurrency, seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--api-workers", type=int, default=1)
    args = parser.parse_args()
    require_wrk()
    # The limiter still counts every request; only the tenant ceiling is lifted, since one
    # tenant sends the whole load here (a per-minute ceiling, not a measure of cost).
    limits = {"feedback_rate_per_tenant": "100000000"}
    with BenchStack(with_vllm=False, api_workers=args.api_workers, api_settings=limits) as stack:
        key, key_id = stack.key("bench")
        with session_scope(stack.sessions) as s:
            repo.ensure_adapter(s, "bench", "bot")
        ids = seed_interactions(stack.sessions, "bench", "bot", key_id, 1000)
        base = asyncio.run(baseline(stack.db_url, args.concurrency, args.requests))
        fw = flywheel(stack.api.url, key, ids, args.concurrency, args.seconds)
    ratio = fw["throughput_rps"] / base["throughput_rps"]
    if fw["non_2xx"] or fw["socket_errors"]:
        raise SystemExit(f"feedback requests failed: {fw}")
    result = {"concurrency": args.concurrency, "baseline_raw_insert": base, "flywheel_feedback": fw,
              "throughput_ratio": round(ratio, 3)}
    print("| | throughput (req/s) | p50 (ms) | p99 (ms) |\n|---|---|---|---|")
    print(f"| raw INSERT (psycopg async) | {base['throughput_rps']} | {base['p50_ms']} | {base['p99_ms']} |")
    print(f"| POST /v1/feedback | {fw['throughput_rps']} | {fw['p50_ms']} | {fw['p99_ms']} |")
    print(f"ratio {ratio:.2f}; saved {save('feedback', result)}")


if __name__ == "__main__":
    main()
