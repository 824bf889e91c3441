"""The AI judge through the real worker and beat: beat sends the judge's sweep, the worker asks
the real vLLM serving SmolLM2 (the default base model) as judge, the ratings start no run on their own, and the run the
humans' ratings start trains on judge ratings within the policy's cap."""

from __future__ import annotations

import math
import time

import httpx
import pytest
from sqlalchemy import func, select

from service.db.models import Feedback
from tests.helpers.auth import bearer
from tests.helpers.data import seed_interactions
from tests.helpers.loop import api_and_worker, loop_policy, policy_dir
from tests.helpers.runs import runs_of, wait_first_run, wait_run

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

POLICY = loop_policy(min_new_ratings=10, max_steps=2, heldout_fraction=0.2,
                     gate={"golden": [{"prompt": "Hi", "no_template_tokens": True}]})
MAX_SHARE = 0.3


@pytest.fixture(scope="module")
def judge_stack(api_settings, stack_root, tmp_path_factory):
    policies = policy_dir(tmp_path_factory.mktemp("judge-loop-policies"), POLICY)
    with api_and_worker(api_settings, stack_root, policies, "judge", judge_interval_s="2",
                        judge_sweep_max_s="20") as stack:
        yield stack


def _judge_count(db_sessions, tenant: str) -> int:
    with db_sessions() as s:
        return s.scalar(select(func.count()).select_from(Feedback).where(
            Feedback.tenant_id == tenant, Feedback.source == "judge"))


def _pairs(db_sessions, tenant: str) -> int:
    """Answers both a human and the judge rated."""
    with db_sessions() as s:
        return s.scalar(select(func.count()).select_from(Feedback).where(
            Feedback.tenant_id == tenant, Feedback.source == "judge",
            Feedback.interaction_id.in_(
                select(Feedback.interaction_id).where(Feedback.tenant_id == tenant,
                                                      Feedback.source == "human"))))


def test_the_workers_judge_feeds_a_run_within_its_cap(judge_stack, smollm2_vllm, db_sessions, make_key,
                                                      make_alias, tenant, stack_root):
    api, worker, policies = judge_stack
    alias = make_alias(tenant)
    ops = make_key(tenant, "ops")
    ids = seed_interactions(db_sessions, tenant, alias, None, 40,
                            prompt="My parcel {i} is late, what now?",
                            answer="Sorry! Parcel {i} ships today.")
    # The judge for this tenant's alias only (the shared database holds other tests' aliases).
    (policies / f"{alias}.yaml").write_text(f"""
tenants: [{tenant}]
judge: {{url: "{smollm2_vllm.url}/v1", model: base, budget_per_hour: 9000, max_share: {MAX_SHARE},
         rubric: "Good answers help.",
         calibration_share: 0.0, min_age_s: 0, retries: 1, backoff_s: 0.2, max_tokens: 48}}
""")
    deadline = time.monotonic() + 180
    while _judge_count(db_sessions, tenant) < 12:
        assert time.monotonic() < deadline, (stack_root / "worker-judge.log").read_text()[-3000:]
        time.sleep(1)
    time.sleep(5)  # two trigger sweeps
    assert runs_of(db_sessions, tenant, alias) == []  # judge ratings alone start nothing

    with httpx.Client(base_url=api.url, timeout=60) as c:
        for n, iid in enumerate(ids[:10]):
            r = c.post("/v1/feedback", headers=bearer(ops), json={
                "interaction_id": iid, "rating": "up" if n % 3 else "down",
                "rater_id": f"user-{n % 4}"})
            assert r.status_code == 201, r.text
        run = wait_first_run(db_sessions, tenant, alias, timeout=30)
        run = wait_run(db_sessions, run.id, {"awaiting_approval", "rejected"}, timeout=300,
                       log=stack_root / "worker-judge.log")
        stats = run.dataset_stats
        human_train = stats["train_items"] - stats["judge_items"]
        cap = math.floor(MAX_SHARE / (1 - MAX_SHARE) * human_train)
        eligible = stats["judge_items"] + stats["dropped_judge_cap"]
        assert eligible >= 1  # judge ratings reached the dataset...
        assert stats["judge_items"] == min(cap, eligible)  # ...and trained up to the cap

        before = _pairs(db_sessions, tenant)  # the judge keeps sweeping while we look
        view = c.get(f"/v1/adapters/{alias}/judge", headers=bearer(ops)).json()
        after = _pairs(db_sessions, tenant)
    assert view["enabled"] and view["model"] == "base"
    assert sum(view["ratings"]["judge"].values()) >= 12
    assert sum(view["ratings"]["human"].values()) == 10
    assert view["sweeps"] and view["sweeps"][0]["model"] == "base"
    assert before <= view["agreement"]["pairs"] <= after
