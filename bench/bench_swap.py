"""Benchmark: consecutive hot swaps under continuous chat traffic, two vLLM (CPU) replicas.

    python bench/bench_swap.py [--swaps 20] [--concurrency 8] [--gap 1.0] [--json F] [--keep]

Starts everything itself in a temporary directory: embedded Postgres and Redis, two vLLM CPU
replicas on the tiny model, and a `flywheel api` in front of them (observer every 0.2 s,
reconciler every 1 s, route cache 0.5 s). A separate process sends chat requests through the
gateway for the whole run while this one swaps the alias to a new version ``--swaps`` times.

Reported per swap: wall time from verify to live on all replicas (``swap_s``) beside the raw
sum of the vLLM load and smoke calls that swap made (``raw_s``, both replicas, as if sequential),
and beside the slowest replica's own load + smoke (the critical path: replicas run in parallel).
Overall: failed requests (any non-200), and stale requests (started more than the route-cache
TTL after a flip, yet served by an older version). Targets: 0 failed, swap_s <= 1.5 x raw_s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy.orm import sessionmaker  # noqa: E402

from service.db import migrate  # noqa: E402
from service.db import repositories as repo  # noqa: E402
from service.db.session import make_sync_engine, session_scope  # noqa: E402
from service.engine import swap as sw  # noqa: E402
from service.local.embedded import ensure_postgres, ensure_redis, stop_postgres, stop_redis  # noqa: E402
from service.local.tiny_model import build_tiny_model  # noqa: E402
from service.security import display_prefix, generate_key, hash_key  # noqa: E402
from tests.helpers.replicas import (  # noqa: E402
    ROUTING_TTL_S,
    ReplicaSet,
    Traffic,
    api_env,
    lora_variant,
    peft_lora,
    register_version,
    served_models,
    swap_config,
)
from tests.helpers.stack import TINY_MODEL_CACHE, ApiProcess  # noqa: E402

TENANT, ALIAS = "bench", "support-bot"


def _traffic(url: str, key: str, concurrency: int, conn) -> None:
    """Child process: send requests until told to stop, then hand back every shot."""
    async def main() -> list[tuple]:
        traffic = Traffic(url, key, ALIAS, concurrency=concurrency)
        runner = asyncio.create_task(traffic.run())
        conn.send(("started", None))
        await asyncio.to_thread(conn.recv)
        traffic.stop()
        await runner
        return [(s.start, s.end, s.status, s.interaction_id, s.error) for s in traffic.shots]
    conn.send(("shots", asyncio.run(main())))


def _critical_path(r: sw.SwapResult) -> float:
    """The slowest replica's load + smoke: what the swap waits for, its phases run in parallel."""
    per_url: dict[str, float] = {}
    for c in r.calls:
        if c.op in ("load", "smoke"):
            per_url[c.url] = per_url.get(c.url, 0.0) + c.seconds
    return max(per_url.values())


def _summary(results: list[sw.SwapResult], shots: list[tuple], served: dict) -> dict:
    ok = [r for r in results if r.ok]
    swap_s = [r.timings["swap"] for r in ok]
    raw_s = [r.raw_calls_s for r in ok]
    critical = [_critical_path(r) for r in ok]
    ratios = [s / r for s, r in zip(swap_s, raw_s, strict=True)]
    flips = [(r.flipped_at, r.lora_name) for r in ok]
    order = {name: i for i, (_, name) in enumerate(flips)}
    stale = 0
    for start, _end, status, iid, _err in shots:
        if status != 200 or iid not in served:
            continue
        due = [name for at, name in flips if at + ROUTING_TTL_S < start]
        model = served[iid][0]
        if due and order.get(model, -1) < order[due[-1]]:
            stale += 1
    failed = [s for s in shots if s[2] != 200]
    return {
        "swaps": len(results), "swaps_ok": len(ok),
        "swap_s": {"median": statistics.median(swap_s), "mean": statistics.fmean(swap_s),
                   "max": max(swap_s)},
        "raw_load_smoke_s": {"median": statistics.median(raw_s), "mean": statistics.fmean(raw_s),
                             "max": max(raw_s)},
        "overhead": {"median": statistics.median(ratios), "max": max(ratios),
                     "total": sum(swap_s) / sum(raw_s)},
        # Against the slowest replica's own calls: the cost of verify, health, lock and flip.
        "critical_path_s": {"median": statistics.median(critical)},
        "overhead_vs_critical_path": {
            "median": statistics.median(s / c for s, c in zip(swap_s, critical, strict=True)),
            "total": sum(swap_s) / sum(critical)},
        "phases_mean_ms": {p: 1000 * statistics.fmean(r.timings.get(p, 0.0) for r in ok)
                           for p in ("lock", "verify", "health", "load", "smoke", "flip",
                                     "unload")},
        "requests": len(shots), "failed_requests": len(failed),
        "failed_examples": [s[4] for s in failed[:3]], "stale_requests": stale,
        "follow_bound_s": ROUTING_TTL_S,
    }


async def _swaps(sessions, rs: ReplicaSet, config, versions: list, gap: float
                 ) -> list[sw.SwapResult]:
    admins = rs.admins()
    out = []
    try:
        for i, (vid, _) in enumerate(versions):
            r = await sw.swap(sessions, admins, vid, config, actor="bench", reason=f"swap {i}")
            out.append(r)
            print(f"swap {i + 1:2d}: {'ok ' if r.ok else 'FAILED ' + str(r.reason)} "
                  f"swap {r.timings.get('swap', 0) * 1000:6.0f} ms  raw load+smoke "
                  f"{r.raw_calls_s * 1000:6.0f} ms", flush=True)
            await asyncio.sleep(gap)
    finally:
        for a in admins:
            await a.aclose()
    return out


def run(n_swaps: int, concurrency: int, gap: float, keep: bool = False) -> dict:
    root = Path(tempfile.mkdtemp(prefix="flywheel-bench-swap-"))
    model = build_tiny_model(TINY_MODEL_CACHE)
    db_url = ensure_postgres(root)
    migrate.upgrade(db_url)
    broker = ensure_redis(root)
    engine = make_sync_engine(db_url)
    sessions = sessionmaker(engine, expire_on_commit=False)
    rs = api = None
    try:
        key = generate_key()
        with session_scope(sessions) as s:
            repo.create_api_key(s, tenant_id=TENANT, role="product", key_hash=hash_key(key),
                                prefix=display_prefix(key))
            repo.ensure_adapter(s, TENANT, ALIAS)
        template = peft_lora(model, root / "template")
        versions = [register_version(sessions, TENANT, ALIAS,
                                     lora_variant(template, root / f"v{i}", seed=i))
                    for i in range(n_swaps + 1)]
        print("starting two vLLM replicas and the API ...", flush=True)
        rs = ReplicaSet.start(model, root)
        api = ApiProcess(env=api_env(db_url, broker.url, rs.urls, model, root / "data"),
                         log=root / "api.log").start()
        config = swap_config(model)
        first = asyncio.run(_swaps(sessions, rs, config, versions[:1], gap=0.0))[0]
        assert first.ok, first.reason

        parent, child = mp.get_context("spawn").Pipe()
        traffic = mp.get_context("spawn").Process(
            target=_traffic, args=(api.url, key, concurrency, child), daemon=True)
        traffic.start()
        assert parent.recv()[0] == "started"
        time.sleep(3)  # traffic at full rate before the first measured swap
        results = asyncio.run(_swaps(sessions, rs, config, versions[1:], gap))
        time.sleep(2)
        parent.send("stop")
        shots = parent.recv()[1]
        traffic.join(30)
        served = served_models(sessions, [s[3] for s in shots])
        summary = _summary(results, shots, served)
        summary["first_swap_at_rest"] = {
            "swap_s": first.timings["swap"], "raw_load_smoke_s": first.raw_calls_s,
            "phases_ms": {k: 1000 * v for k, v in first.timings.items()}}
        summary["setup"] = {"replicas": 2, "concurrency": concurrency, "gap_s": gap,
                            "cpu_cores": mp.cpu_count(), "model": "tiny llama (2 layers)",
                            "max_tokens": 2}
        return summary
    finally:
        if api is not None:
            api.stop()
        if rs is not None:
            rs.stop()
        engine.dispose()
        stop_redis(root)
        stop_postgres(root)
        if keep:
            print(f"logs and data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--gap", type=float, default=1.0, help="seconds between swaps")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args()
    summary = run(args.swaps, args.concurrency, args.gap, args.keep)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    ok = summary["failed_requests"] == 0 and summary["swaps_ok"] == summary["swaps"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
