"""The `flywheel` CLI against the session's real Postgres: each command, and bad arguments."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from service.db import repositories as repo
from service.db.models import Adapter, AuditEvent, TrainingRun
from service.db.session import session_scope
from service.security import hash_key
from tests.helpers.cli import flywheel


def test_migrate_is_idempotent(cli_env):
    r = flywheel(cli_env, "migrate")
    assert r.returncode == 0 and "revision" in r.stdout


def test_keys_create_list_revoke(cli_env, db_sessions, tenant):
    r = flywheel(cli_env, "keys", "create", "--tenant", tenant, "--role", "ops", "--name", "cli test")
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip().splitlines()[-1]
    assert key.startswith("fw_") and "shown only once" in r.stderr
    with db_sessions() as s:
        [row] = repo.list_api_keys(s, tenant)
    assert row.key_hash == hash_key(key) and row.role == "ops"
    listing = flywheel(cli_env, "keys", "list", "--tenant", tenant)
    assert row.prefix in listing.stdout and key not in listing.stdout
    assert flywheel(cli_env, "keys", "revoke", row.prefix).returncode == 0
    with db_sessions() as s:
        assert repo.list_api_keys(s, tenant)[0].revoked_at is not None
    r = flywheel(cli_env, "keys", "revoke", "no-such-key")
    assert r.returncode == 2 and "no key" in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["keys", "create", "--tenant", "t", "--role", "admin"], "'admin' is not one of"),
    (["keys", "create", "--role", "ops"], "--tenant"),
    (["adapters", "create", "Bad Alias!", "--tenant", "t"], "a-z"),
    (["runs", "show", "not-a-uuid"], "not a run id"),
    (["runs", "approve", "not-a-uuid"], "not a run id"),
    (["runs", "list", "--limit", "0"], "--limit"),
    (["make-tiny-model"], "OUT_DIR"),
    (["no-such-command"], "No such command"),
])
def test_bad_arguments_exit_2_with_a_clear_message(cli_env, args, needle):
    r = flywheel(cli_env, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle.lower() in (r.stdout + r.stderr).lower()


def test_engine_on_a_model_it_cannot_serve_is_a_usage_error(cli_env, tmp_path):
    # Unset, FLYWHEEL_BASE_MODEL means the default model (served, not refused): see
    # test_models_cli for the entry points on the default and on a model without a template.
    env = {**cli_env, "FLYWHEEL_BASE_MODEL": str(tmp_path / "missing-model")}
    r = flywheel(env, "engine")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "missing-model" in r.stderr and "does not exist" in r.stderr


def _pending_decision(db_sessions, tenant) -> uuid.UUID:
    with session_scope(db_sessions) as s:
        adapter = repo.ensure_adapter(s, tenant, "cli-bot")
        run = TrainingRun(tenant_id=tenant, adapter_id=adapter.id, state="awaiting_approval",
                          trigger={}, policy={}, progress={"step": 3, "total_steps": 6, "loss": 1.25})
        s.add(run)
        s.flush()
        return run.id


def test_runs_list_show_approve_reject(cli_env, db_sessions, tenant):
    run_id = _pending_decision(db_sessions, tenant)
    listing = flywheel(cli_env, "runs", "list", "--tenant", tenant)
    assert str(run_id) in listing.stdout and "awaiting_approval" in listing.stdout
    assert "3/6 loss 1.250" in listing.stdout
    shown = flywheel(cli_env, "runs", "show", str(run_id))
    assert shown.returncode == 0 and "awaiting_approval" in shown.stdout
    r = flywheel(cli_env, "runs", "reject", str(run_id), "--reason", "not today")
    assert r.returncode == 0 and "rejected" in r.stdout
    again = flywheel(cli_env, "runs", "approve", str(run_id))
    assert again.returncode == 1 and "not awaiting_approval" in again.stderr
    missing = flywheel(cli_env, "runs", "approve", str(uuid.uuid4()))
    assert missing.returncode == 2 and "not found" in missing.stderr
    with db_sessions() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.target_id == str(run_id))).one()
    assert (event.actor, event.action, event.reason) == ("cli", "run.rejected", "not today")


def test_adapters_create_and_status(cli_env, db_sessions, tenant):
    assert flywheel(cli_env, "adapters", "create", "faq-bot", "--tenant", tenant).returncode == 0
    with db_sessions() as s:
        assert s.scalars(select(Adapter).where(Adapter.tenant_id == tenant)).one().alias == "faq-bot"
    status = flywheel(cli_env, "status")
    assert status.returncode == 0 and "faq-bot" in status.stdout
    assert "http://127.0.0.1:9: down" in status.stdout


def test_policies_check_names_file_and_field(cli_env, tmp_path):
    (tmp_path / "default.yaml").write_text("approval: auto\n")
    ok = flywheel(cli_env, "policies", "check", policy_dir=str(tmp_path))
    assert ok.returncode == 0 and "valid" in ok.stdout
    (tmp_path / "support-bot.yaml").write_text("tenants: '*'\ntrigger: {min_new_ratings: -3}\n")
    bad = flywheel(cli_env, "policies", "check", policy_dir=str(tmp_path))
    assert bad.returncode == 1
    assert "support-bot.yaml" in bad.stderr and "trigger.min_new_ratings" in bad.stderr
