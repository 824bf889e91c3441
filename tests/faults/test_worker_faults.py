"""Worker and broker failures: nothing lost, nothing run twice."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from service.db import repositories as repo
from service.db.models import Adapter, AdapterVersion, AuditEvent, Export, Feedback, TrainingRun
from service.db.session import session_scope
from service.domain import exports
from service.engine.artifact import artifact_sha256
from service.local.embedded import ensure_redis, stop_redis
from service.wakeup import wake_export
from tests.helpers.auth import bearer
from tests.helpers.cli import flywheel
from tests.helpers.data import api_key_id, seed_interactions
from tests.helpers.loop import LONG_RUN_POLICY, policy_dir, rate_all, rated_run
from tests.helpers.runs import wait_first_run, wait_run
from tests.helpers.stack import ApiProcess, WorkerProcess, flywheel_env
from tests.helpers.vllm import make_random_lora

pytestmark = [pytest.mark.faults, pytest.mark.slow]

@pytest.fixture(scope="module")
def fault_env(api_settings, stack_root, tmp_path_factory):
    policies = policy_dir(tmp_path_factory.mktemp("fault-policies"), LONG_RUN_POLICY)
    return {**api_settings, "policy_dir": str(policies), "artifact_dir": str(stack_root / "fault-artifacts"),
            "run_lease_s": "6", "sweep_interval_s": "1"}


def _wait_for_step(db_sessions, run_id, step: int, timeout: float = 300) -> TrainingRun:
    """The run once its training reported `step` (progress is written once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        with db_sessions() as s:
            run = s.get(TrainingRun, run_id)
        if (run.progress or {}).get("step", 0) >= step or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def _one_version_lineage(db_sessions, run_id) -> dict:
    with db_sessions() as s:
        versions = list(s.scalars(select(AdapterVersion).where(AdapterVersion.run_id == run_id)))
    assert len(versions) == 1
    return json.loads((Path(versions[0].artifact_path) / "lineage.json").read_text())


def test_kill9_worker_mid_training_reattaches_to_the_running_job(fault_env, stack_root, db_sessions,
                                                                 make_key, make_alias, tenant):
    """The training runs in a job of its own (`accelerate launch`): a worker crash does not stop
    it, and the worker that takes the run over follows the same job to its end."""
    env = flywheel_env(**fault_env)
    api = ApiProcess(env=env, log=stack_root / "api-kill9.log").start()
    worker = WorkerProcess(env=env, log=stack_root / "worker-kill9-a.log", beat=True).start()
    second = None
    try:
        key, alias = make_key(tenant, "product"), make_alias(tenant)
        run = rated_run(db_sessions, api.url, key, tenant, alias, 12)
        # 150 steps: training must outlast the crash, the lease and the second worker's start.
        run = _wait_for_step(db_sessions, run.id, 12)
        assert run.state == "training" and 12 <= run.progress["step"] < 150
        job = run.trainer_job
        assert job["backend"] == "local" and job["attempt"] == 1
        worker.kill9()

        second = WorkerProcess(env=env, log=stack_root / "worker-kill9-b.log", name="w2", beat=True).start()
        run = wait_run(db_sessions, run.id, {"awaiting_approval"}, timeout=400, log=second.log)
        assert run.attempts >= 2  # claimed again, by the second worker
        assert run.trainer_job["pid"] == job["pid"] and run.trainer_job["attempt"] == 1
        lineage = _one_version_lineage(db_sessions, run.id)
        # Never interrupted, so never resumed: one training from step 0 to 150.
        assert lineage["training"]["resumed_from_step"] is None
        assert lineage["training"]["metrics"]["steps"] == 150
        assert run.progress["loss_history"][0][0] <= 12  # the re-attached worker read it all
    finally:
        if second:
            second.stop()
        worker.stop()
        api.stop()


def test_kill9_training_process_resumes_from_checkpoint(fault_env, stack_root, db_sessions,
                                                        make_key, make_alias, tenant):
    """A training process killed like the OOM killer does (SIGKILL, no cleanup): the worker
    starts the job again, which resumes from its last checkpoint; one version comes out."""
    env = flywheel_env(**fault_env)
    api = ApiProcess(env=env, log=stack_root / "api-kill9-trainer.log").start()
    worker = WorkerProcess(env=env, log=stack_root / "worker-kill9-trainer.log", beat=True).start()
    try:
        key, alias = make_key(tenant, "product"), make_alias(tenant)
        run = rated_run(db_sessions, api.url, key, tenant, alias, 12)
        run = _wait_for_step(db_sessions, run.id, 12)
        assert run.state == "training" and 12 <= run.progress["step"] < 150
        spec = str(Path(run.trainer_job["dir"]) / "spec.json").encode()
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                and _argv(p)[-2:] == [b"--spec", spec] and b"accelerate.commands.launch" not in _argv(p)]
        assert pids, "no training process found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

        run = wait_run(db_sessions, run.id, {"awaiting_approval"}, timeout=400, log=worker.log)
        assert run.trainer_job["attempt"] == 2 and run.trainer_job["restarts"] == 1
        # Shown: the API and ops page without the job's path or pid, the CLI with them.
        shown = httpx.get(f"{api.url}/v1/runs/{run.id}", headers=bearer(make_key(tenant, "ops"))).json()
        job = shown["training_job"]
        assert job["attempt"] == 2 and job["restarts"] == 1 and job["backend"] == "local"
        assert "exited with code" in job["previous_end"] and not {"dir", "pid"} & set(job)
        cli = flywheel({**env, "COLUMNS": "400"}, "runs", "show", str(run.id))
        assert cli.returncode == 0, cli.stderr
        assert "local attempt 2 (restarts 1)" in cli.stdout and run.trainer_job["dir"] in cli.stdout
        lineage = _one_version_lineage(db_sessions, run.id)
        resumed = lineage["training"]["resumed_from_step"]
        # A real checkpoint (every 5 steps), and training went on from it to the end.
        assert resumed is not None and 5 <= resumed < 150 and resumed % 5 == 0
        assert lineage["training"]["metrics"]["steps"] == 150
    finally:
        worker.stop()
        api.stop()


def _argv(proc: Path) -> list[bytes]:
    try:
        return (proc / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return []


def test_redis_down_during_ingestion_loses_nothing_and_run_starts_after(fault_env, stack_root, tmp_path,
                                                                        db_sessions, make_key,
                                                                        make_alias, tenant):
    broker_root = tmp_path / "broker"
    redis = ensure_redis(broker_root)
    env = flywheel_env(**{**fault_env, "broker_url": redis.url})
    api = ApiProcess(env=env, log=stack_root / "api-redis-down.log").start()
    worker = WorkerProcess(env=env, log=stack_root / "worker-redis-down.log", beat=True).start()
    try:
        key, alias = make_key(tenant, "product"), make_alias(tenant)
        ids = seed_interactions(db_sessions, tenant, alias, api_key_id(db_sessions, key), 30)
        assert rate_all(api.url, key, ids[:5]) == [201] * 5
        stop_redis(broker_root)
        sent = rate_all(api.url, key, ids[5:])  # crosses the threshold while Redis is down
        assert sent == [201] * 25
        run = wait_first_run(db_sessions, tenant, alias)
        time.sleep(3)
        with db_sessions() as s:
            assert s.get(TrainingRun, run.id).state == "pending"  # nobody could be woken
            stored = s.scalar(select(func.count()).select_from(Feedback)
                              .where(Feedback.adapter_id == run.adapter_id))
        assert stored == 30  # 0 feedback lost
        assert httpx.get(f"{api.url}/readyz").json()["checks"]["broker"].startswith("unavailable")

        ensure_redis(broker_root, port=redis.port)  # Redis returns on the same port
        run = wait_run(db_sessions, run.id, {"training", "evaluating", "awaiting_approval"},
                       timeout=120, log=worker.log)
        assert run.state in ("training", "evaluating", "awaiting_approval")
    finally:
        worker.stop()
        api.stop()
        stop_redis(broker_root)


def test_kill9_worker_mid_export_hands_the_job_to_another(fault_env, stack_root, db_sessions,
                                                          make_alias, tenant, tiny_model, tmp_path,
                                                          broker_url):
    """A worker dies (kill -9) while exporting: its lease runs out, the sweeper re-sends the job,
    a second worker builds it from the start, and exactly one passed export is recorded."""
    alias = make_alias(tenant)
    (Path(fault_env["policy_dir"]) / f"{tenant}--{alias}.yaml").write_text(
        'gate: {golden: [{prompt: "Where is Paris?"}, {prompt: "My order is late."}]}\n'
        "export: {max_new_tokens: 8}\n")
    artifact = make_random_lora(tiny_model, tmp_path / "v1", seed=4)
    with session_scope(db_sessions) as s:
        adapter = s.scalars(select(Adapter).where(Adapter.tenant_id == tenant,
                                                  Adapter.alias == alias)).one()
        version = repo.create_version(s, adapter, artifact_path=str(artifact),
                                      sha256=artifact_sha256(artifact), parent_version_id=None,
                                      run_id=None, lineage={})
        export, _ = exports.request_export(s, version, fmt="merged", quant=None, fallback=False,
                                           actor="test")
        export_id = export.id
    env = flywheel_env(**fault_env)
    worker = WorkerProcess(env=env, log=stack_root / "worker-export-kill9-a.log", name="wxa").start()
    second = None
    try:
        assert wake_export(broker_url, export_id)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with db_sessions() as s:
                row = s.get(Export, export_id)
            if row.status != "queued":
                break
            time.sleep(0.05)
        assert row.status == "running" and row.attempts == 1, worker.log.read_text()[-2000:]
        worker.kill9()

        second = WorkerProcess(env=env, log=stack_root / "worker-export-kill9-b.log", name="wxb",
                               beat=True).start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with db_sessions() as s:
                row = s.get(Export, export_id)
            if row.status not in ("queued", "running"):
                break
            time.sleep(0.3)
        assert row.status == "passed", (row.status, row.failure_reason,
                                        second.log.read_text()[-2000:])
        assert row.attempts == 2 and Path(row.path, "model.safetensors").is_file()
        with db_sessions() as s:
            assert len(s.scalars(select(Export).where(Export.version_id == version.id)).all()) == 1
            assert [a.action for a in s.scalars(select(AuditEvent).where(
                AuditEvent.target_id == str(export_id)).order_by(AuditEvent.id))] == [
                "export.requested", "export.passed"]
    finally:
        if second:
            second.stop()
        worker.stop()
