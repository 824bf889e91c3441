"""Feedback through the API → exactly one run → real Celery worker trains → eval gate → approval."""

from __future__ import annotations

import pathlib
import time

import httpx
import pytest
from sqlalchemy import select

from service.db.models import AdapterVersion, AuditEvent, EvalResult
from service.engine.artifact import verify_artifact
from tests.helpers.auth import METRICS_AUTH, bearer
from tests.helpers.loop import WATCH, api_and_worker, chat_and_rate, loop_policy, policy_dir, served_by
from tests.helpers.runs import wait_first_run, wait_run

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

POLICY = loop_policy(min_new_ratings=16, max_steps=6, heldout_fraction=0.4, watch=WATCH,
                     rollback={"automatic": True})


@pytest.fixture(scope="module")
def loop_stack(api_settings, stack_root, tmp_path_factory):
    policies = policy_dir(tmp_path_factory.mktemp("loop-policies"), POLICY)
    with api_and_worker(api_settings, stack_root, policies, "loop", watch_interval_s="2") as stack:
        yield stack


def test_feedback_to_gated_candidate_through_the_real_worker(loop_stack, make_key, make_alias, tenant,
                                                             db_sessions, api_settings):
    api, worker, _ = loop_stack
    key, ops = make_key(tenant, "product"), make_key(tenant, "ops")
    alias = make_alias(tenant)
    with httpx.Client(base_url=api.url, timeout=60) as c:
        chat_and_rate(c, key, alias, 16, heldout_fraction=0.4)
        run = wait_first_run(db_sessions, tenant, alias)
        run = wait_run(db_sessions, run.id, {"awaiting_approval", "rejected"}, timeout=400,
                       log=worker.log)
        assert run.state == "awaiting_approval", run.verdict
        assert run.method in ("sft", "kto", "dpo") and run.method_reason
        assert run.dataset_stats["train_items"] > 0
        assert run.progress["step"] == run.progress["total_steps"] == 6
        assert run.verdict["passed"] is True

        with db_sessions() as s:
            version = s.get(AdapterVersion, run.candidate_version_id)
            results = list(s.scalars(select(EvalResult).where(EvalResult.run_id == run.id)))
        # Staged: the gate's golden case generated with it through vLLM.
        assert version.lora_name == f"{tenant}--{alias}--v1" and version.status == "staged"
        verify_artifact(version.artifact_path, expected_sha256=version.sha256,
                        engine_base_model=api_settings["base_model"], max_lora_rank=16)
        assert {"preference_accuracy", "nll_candidate", "nll_reference", "n_heldout",
                "golden"} <= {r.metric for r in results}

        # No PII from the feedback reaches the training files.
        data_dir = version.artifact_path.rsplit("/", 1)[0] + "/data"
        text = "".join(p.read_text() for p in pathlib.Path(data_dir).glob("*.jsonl"))
        assert "user@example.com" not in text and "[EMAIL]" in text

        # Product keys cannot decide; ops can see the run and its gate metrics.
        assert c.post(f"/v1/runs/{run.id}/approve", headers=bearer(key)).status_code == 403
        detail = c.get(f"/v1/runs/{run.id}", headers=bearer(ops)).json()
        assert detail["state"] == "awaiting_approval" and detail["candidate_version"] == version.lora_name
        assert detail["lineage"]["dataset"]["sha256"]
        r = c.post(f"/v1/runs/{run.id}/reject", headers=bearer(ops), json={"reason": "demo says no"})
        assert r.status_code == 200 and r.json()["state"] == "rejected"
        assert c.post(f"/v1/runs/{run.id}/approve", headers=bearer(ops)).status_code == 409
    with db_sessions() as s:
        actions = [a.action for a in s.scalars(select(AuditEvent).where(AuditEvent.tenant_id == tenant)
                                                .order_by(AuditEvent.id))]
    assert actions[-4:] == ["run.trained", "adapter.stage", "run.gate_passed", "run.rejected"]


def test_approved_version_goes_live_then_rolls_back_on_thumbs_down(loop_stack, make_key, make_alias,
                                                                   tenant, db_sessions):
    api, worker, _ = loop_stack
    key, ops = make_key(tenant, "product"), make_key(tenant, "ops")
    alias = make_alias(tenant)
    with httpx.Client(base_url=api.url, timeout=60) as c:
        chat_and_rate(c, key, alias, 16)  # base: 50% thumbs-up
        run = wait_first_run(db_sessions, tenant, alias)
        run = wait_run(db_sessions, run.id, {"awaiting_approval"}, timeout=400, log=worker.log)
        r = c.post(f"/v1/runs/{run.id}/approve", headers=bearer(ops), json={"reason": "looks good"})
        assert r.status_code == 200 and r.json()["state"] in ("approved", "deploying", "live")
        run = wait_run(db_sessions, run.id, {"live"}, timeout=120, log=worker.log)
        with db_sessions() as s:
            version = s.get(AdapterVersion, run.candidate_version_id)
        assert version.status == "live"

        # Within the routing bound, the alias is served by the new version.
        served = served_by(c, key, alias, version.lora_name, timeout=10)
        assert served["served_model"] == version.lora_name
        assert served["version_id"] == str(version.id)

        chat_and_rate(c, key, alias, 12, rating="down")  # the new version: 0% thumbs-up
        run = wait_run(db_sessions, run.id, {"rolled_back"}, timeout=60, log=worker.log)
        assert "drop" in run.verdict["watch"]
        r = c.post("/v1/chat/completions", headers=bearer(key), json={
            "model": alias, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        time.sleep(1)
        r = c.post("/v1/chat/completions", headers=bearer(key), json={
            "model": alias, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert c.get(f"/v1/interactions/{r.headers['x-interaction-id']}",
                     headers=bearer(key)).json()["served_model"] == "base"
        # The loop's state, read from Postgres, is on the API's /metrics for Prometheus.
        scraped = c.get("/metrics", headers=METRICS_AUTH).text
        for line in (f'flywheel_rollbacks{{kind="automatic",tenant="{tenant}"}} 1.0',
                     'flywheel_runs{state="rolled_back"}', 'flywheel_gate_verdicts{verdict="passed"}',
                     f'flywheel_swap_seconds{{alias="{alias}",tenant="{tenant}"}}',
                     f'flywheel_training_seconds{{alias="{alias}",tenant="{tenant}"}}',
                     f'flywheel_feedback_threshold{{alias="{alias}",tenant="{tenant}"}} 16.0'):
            assert line in scraped, line
    with db_sessions() as s:
        events = {a.action: a for a in s.scalars(select(AuditEvent).where(AuditEvent.tenant_id == tenant))}
    assert {"run.approved", "run.rolled_back"} <= set(events)
    assert events["run.approved"].reason == "looks good" and events["run.approved"].actor.startswith("key:")
    assert "thumbs-up 0%" in events["run.rolled_back"].reason


def test_golden_suite_failure_blocks_promotion(loop_stack, make_key, make_alias, tenant, db_sessions):
    api, worker, policies = loop_stack
    key = make_key(tenant, "product")
    alias = make_alias(tenant)
    # A tenant-and-alias policy file, picked up without a restart.
    policy_file = policies / f"{tenant}--{alias}.yaml"
    policy_file.write_text('gate: {golden: [{prompt: "My order is late.", must_contain: ["zebra"], '
                           'max_tokens: 8}]}\n')
    time.sleep(1.2)
    with httpx.Client(base_url=api.url, timeout=60) as c:
        chat_and_rate(c, key, alias, 16)
        run = wait_first_run(db_sessions, tenant, alias)
        run = wait_run(db_sessions, run.id, {"rejected", "awaiting_approval"}, timeout=400, log=worker.log)
        assert run.state == "rejected"
        assert run.verdict["reasons"] == ["golden case 'My order is late.' failed: missing 'zebra'"]
        with db_sessions() as s:
            version = s.get(AdapterVersion, run.candidate_version_id)
            golden = s.scalars(select(EvalResult).where(EvalResult.run_id == run.id,
                                                        EvalResult.metric == "golden")).one()
        assert version.status == "failed" and "golden" in version.failure_reason
        assert golden.passed is False and "output" in golden.detail
        # Generated through vLLM with the candidate staged (loaded on every replica) first.
        with db_sessions() as s:
            staged = s.scalars(select(AuditEvent).where(AuditEvent.action == "adapter.stage",
                                                        AuditEvent.target_id == str(version.id))).all()
        assert len(staged) == 1
        adapters = c.get("/v1/adapters", headers=bearer(make_key(tenant, "ops"))).json()
        assert [a["serving"] for a in adapters if a["alias"] == alias] == ["base"]
