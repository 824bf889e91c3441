"""A run trained by two CPU processes (DDP, gloo) through the daemon: the real API, worker and
trainer backend, with FLYWHEEL_TRAIN_PROCESSES=2; the run row shows the training's world size,
its job and its progress, and one version comes out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from service.db.models import AdapterVersion
from tests.helpers.loop import loop_policy, policy_dir, rated_run
from tests.helpers.runs import wait_run
from tests.helpers.stack import ApiProcess, WorkerProcess, flywheel_env

pytestmark = pytest.mark.slow


def test_a_run_trains_with_two_processes_through_the_worker(api_settings, stack_root, tmp_path,
                                                             db_sessions, make_key, make_alias, tenant):
    policies = policy_dir(tmp_path / "policies", loop_policy(
        min_new_ratings=8, max_steps=6, heldout_fraction=0.2, training={"method": "sft"}))
    env = flywheel_env(**{**api_settings, "policy_dir": str(policies),
                          "artifact_dir": str(stack_root / "ddp-artifacts"), "train_processes": "2"})
    with ApiProcess(env=env, log=stack_root / "api-ddp.log") as api, \
            WorkerProcess(env=env, log=stack_root / "worker-ddp.log", name="wddp") as worker:
        key, alias = make_key(tenant, "product"), make_alias(tenant)
        run = rated_run(db_sessions, api.url, key, tenant, alias, 8)
        run = wait_run(db_sessions, run.id, {"awaiting_approval"}, timeout=400, log=worker.log)

    training = run.metrics["training"]
    assert training["world_size"] == 2 and training["backend"] == "gloo"
    assert training["steps"] == 6
    job = Path(run.trainer_job["dir"])
    assert run.trainer_job["attempt"] == 1 and job.parent.name == str(run.id)
    launch = json.loads((job / "launch.json").read_text())["launch"]
    assert launch["processes"] == 2 and launch["config_file"].endswith("ddp_cpu.yaml")
    # Rank 0 alone reported progress: each step once, in the run row's loss history.
    steps = [point[0] for point in run.progress["loss_history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    with db_sessions() as s:
        versions = list(s.scalars(select(AdapterVersion).where(AdapterVersion.run_id == run.id)))
    assert len(versions) == 1
    lineage = json.loads((Path(versions[0].artifact_path) / "lineage.json").read_text())
    assert lineage["training"]["metrics"]["world_size"] == 2
