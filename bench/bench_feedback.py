"""Feedback ingestion: POST /v1/feedback at 32 concurrent clients vs a raw single-row insert.

Run:  python -m bench.bench_feedback [--requests 4000] [--seconds 10] [--concurrency 32]
                                     [--rounds 3] [--api-workers 1]
Needs wrk (apt-get install -y wrk) for the HTTP side.

Both sides run in this one process against the same embedded Postgres in the same run: the
baseline is psycopg's async single-row INSERT (one statement, 32 pooled connections, driven
from Python); Flywheel's side is the full HTTP route (auth, validation, upsert, trigger mark),
driven by wrk at the same concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from psycopg_pool import AsyncConnectionPool

from bench._stack import BenchStack, save, summarize
from bench._wrk import require_wrk, run_wrk
from service.db import repositories as repo
from service.db.session import session_scope
from tests.helpers.data import seed_interactions
from tests.helpers.metrics import sample


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
    parser.add_argument("--rounds", type=int, default=3,
                        help="baseline and route alternate this many times (the machine is noisy)")
    args = parser.parse_args()
    require_wrk()
    # The limiter still counts every request; only its ceilings are lifted, since one tenant
    # and 1000 raters send the whole load here (per-minute ceilings, not a measure of cost).
    limits = {"feedback_rate_per_tenant": "100000000", "feedback_rate_per_rater": "100000000"}
    rounds = []
    with BenchStack(with_vllm=False, api_workers=args.api_workers, api_settings=limits) as stack:
        key, key_id = stack.key("bench")
        with session_scope(stack.sessions) as s:
            repo.ensure_adapter(s, "bench", "bot")
        ids = seed_interactions(stack.sessions, "bench", "bot", key_id, 1000)
        for _ in range(args.rounds):
            base = asyncio.run(baseline(stack.db_url, args.concurrency, args.requests))
            fw = flywheel(stack.api.url, key, ids, args.concurrency, args.seconds)
            if fw["non_2xx"] or fw["socket_errors"]:
                raise SystemExit(f"feedback requests failed: {fw}")
            rounds.append({"baseline_raw_insert": base, "flywheel_feedback": fw,
                           "throughput_ratio": round(fw["throughput_rps"]
                                                     / base["throughput_rps"], 3)})
        batches = _batch_sizes(stack.api.url)
    result = {"concurrency": args.concurrency, "api_workers": args.api_workers, "rounds": rounds,
              "median_ratio": statistics.median(r["throughput_ratio"] for r in rounds),
              "mean_batch_size": batches}
    print("| round | raw INSERT req/s (p50 / p99 ms) | POST /v1/feedback req/s (p50 / p99 ms) "
          "| ratio |\n|---|---|---|---|")
    for n, r in enumerate(rounds, 1):
        b, f = r["baseline_raw_insert"], r["flywheel_feedback"]
        print(f"| {n} | {b['throughput_rps']} ({b['p50_ms']} / {b['p99_ms']}) "
              f"| {f['throughput_rps']} ({f['p50_ms']} / {f['p99_ms']}) | {r['throughput_ratio']} |")
    print(f"median ratio {result['median_ratio']:.2f}; mean ratings per statement {batches}; "
          f"saved {save('feedback', result)}")


def _batch_sizes(api_url: str) -> float | None:
    """Mean ratings per statement over the run, from the API's own metric."""
    import httpx

    text = httpx.get(f"{api_url}/metrics", timeout=10).text
    count = sample(text, "flywheel_feedback_batch_size_count")
    return round(sample(text, "flywheel_feedback_batch_size_sum") / count, 1) if count else None

if __name__ == "__main__":
    main()
