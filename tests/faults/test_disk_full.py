"""A full artifact disk: the run fails with a clear reason; nothing partial is recorded."""

from __future__ import annotations

import subprocess

import httpx
import pytest
from sqlalchemy import func, select

from service.db.models import Adapter, AdapterVersion, Feedback
from tests.helpers.auth import bearer
from tests.helpers.loop import LONG_RUN_POLICY, policy_dir, rated_run
from tests.helpers.runs import wait_run
from tests.helpers.stack import ApiProcess, WorkerProcess, flywheel_env

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.fixture()
def tiny_disk(tmp_path):
    """A real 192 KiB filesystem (tmpfs; the tests run as root, as CI does)."""
    mount = tmp_path / "artifacts"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_artifact_disk_fails_the_run_clearly_and_corrupts_nothing(
        tiny_disk, api_settings, stack_root, tmp_path, db_sessions, make_key, make_alias, tenant):
    policies = policy_dir(tmp_path / "policies", LONG_RUN_POLICY)
    env = flywheel_env(**{**api_settings, "policy_dir": str(policies), "artifact_dir": str(tiny_disk),
                          "sweep_interval_s": "1"})
    api = ApiProcess(env=env, log=stack_root / "api-disk.log").start()
    worker = WorkerProcess(env=env, log=stack_root / "worker-disk.log", beat=True).start()
    try:
        key, alias = make_key(tenant, "product"), make_alias(tenant)
        run = rated_run(db_sessions, api.url, key, tenant, alias, 12)
        run = wait_run(db_sessions, run.id, {"failed", "awaiting_approval"}, timeout=300, log=worker.log)
        assert run.state == "failed"
        assert run.failure_reason.startswith(f"artifact disk full ({tiny_disk})")
        with db_sessions() as s:
            assert s.scalars(select(AdapterVersion).where(AdapterVersion.run_id == run.id)).first() is None
            adapter = s.scalars(select(Adapter).where(Adapter.tenant_id == tenant)).one()
            assert adapter.serving_version_id is None
            assert s.scalar(select(func.count()).select_from(Feedback)
                            .where(Feedback.adapter_id == adapter.id)) == 12
        # No complete-looking artifact was left behind (written beside, renamed into place).
        assert not list(tiny_disk.rglob("adapter/adapter_model.safetensors"))
        # The service keeps serving and accepting feedback.
        with httpx.Client(base_url=api.url, timeout=30) as c:
            r = c.post("/v1/chat/completions", headers=bearer(key), json={
                "model": alias, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
            assert c.post("/v1/feedback", headers=bearer(key), json={
                "interaction_id": r.headers["x-interaction-id"], "rating": "up"}).status_code == 201
    finally:
        worker.stop()
        api.stop()
