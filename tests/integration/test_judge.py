"""The AI judge against real parts: Postgres, the real vLLM (CPU) serving the base model as the
judge, and real HTTP servers that are down, slow or answer garbage. What a verdict says is not
the point (the tiny model is no judge); the plumbing, budget, failure handling, caps on the
trigger, and the agreement figure through the API are."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import func, select, text

from service.db.models import Adapter, Feedback, JudgeSweep, TrainingRun
from service.db.session import session_scope
from service.domain.policy import JudgePolicy, Policy, TriggerPolicy
from service.domain.trigger import start_run_if_due
from service.local.embedded import free_port
from tests.helpers.auth import METRICS_AUTH, bearer
from tests.helpers.data import seed_interactions
from workers.judge import judge_alias

pytestmark = pytest.mark.vllm


def _policy(url: str, **kw) -> JudgePolicy:
    # A short rubric: the tiny model's context is 256 tokens (a longer prompt is a 400, skipped).
    return JudgePolicy(**{"url": url, "model": "base", "min_age_s": 0, "calibration_share": 0.0,
                          "rubric": "Good answers help.",
                          "retries": 1, "backoff_s": 0.1, "timeout_s": 60, "max_tokens": 48,
                          **kw})


def _adapter_id(db_sessions, tenant: str, alias: str) -> uuid.UUID:
    with session_scope(db_sessions) as s:
        return s.scalars(select(Adapter.id).where(Adapter.tenant_id == tenant,
                                                  Adapter.alias == alias)).one()


def _judge_rows(db_sessions, adapter_id) -> list[Feedback]:
    with session_scope(db_sessions) as s:
        return list(s.scalars(select(Feedback).where(Feedback.adapter_id == adapter_id,
                                                     Feedback.source == "judge")))


def _human(db_sessions, tenant: str, adapter_id, ids: list[str], ratings: list[str]) -> None:
    with session_scope(db_sessions) as s:
        for iid, rating in zip(ids, ratings, strict=True):
            s.add(Feedback(interaction_id=uuid.UUID(iid), tenant_id=tenant, adapter_id=adapter_id,
                           rater_id=f"user-{iid[:4]}", rating=rating))


class _Fake(BaseHTTPRequestHandler):
    """A real HTTP judge that misbehaves as told (garbage or slow)."""

    behaviour = "garbage"
    calls = 0

    def do_POST(self):  # noqa: N802 - http.server's name
        type(self).calls += 1
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.behaviour == "slow":
            time.sleep(2.0)
        body = json.dumps({"choices": [{"message": {"content": "As an AI I cannot rate."}}]})
        try:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())
        except OSError:
            pass  # the client gave up (slow): nothing to answer

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_judge():
    servers = []

    def start(behaviour: str) -> tuple[str, type]:
        handler = type(f"Fake{behaviour}", (_Fake,), {"behaviour": behaviour, "calls": 0})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/v1", handler

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_the_judge_rates_unrated_answers_within_its_hourly_budget(smollm2_vllm, db_sessions, make_alias,
                                                                  tenant):
    alias = make_alias(tenant)
    adapter_id = _adapter_id(db_sessions, tenant, alias)
    ids = seed_interactions(db_sessions, tenant, alias, None, 10,
                            prompt="Where is my order {i}?", answer="It ships tomorrow ({i}).")
    _human(db_sessions, tenant, adapter_id, ids[:2], ["up", "down"])  # rated: not sampled
    policy = _policy(f"{smollm2_vllm.url}/v1", budget_per_hour=6)

    res = judge_alias(db_sessions, adapter_id, policy, limit=100, rng=random.Random(1))
    assert res is not None and res.attempted == 6 and res.budget_left == 0
    assert res.rated + sum(res.skipped.values()) == 6
    assert res.rated >= 4, res.as_dict()  # structured output keeps even the tiny model parseable
    rows = _judge_rows(db_sessions, adapter_id)
    assert len(rows) == res.rated
    assert {r.rater_id for r in rows} == {"judge:base"}
    assert {r.rating for r in rows} <= {"up", "down"}
    assert not {str(r.interaction_id) for r in rows} & set(ids[:2])
    with session_scope(db_sessions) as s:
        sweep = s.scalars(select(JudgeSweep).where(JudgeSweep.adapter_id == adapter_id)).one()
        assert (sweep.attempted, sweep.rated, sweep.model) == (6, res.rated, "base")
        assert sweep.finished_at is not None and sweep.stopped is None
    # The hour's budget is spent: the next sweep sends nothing and records nothing.
    assert judge_alias(db_sessions, adapter_id, policy, limit=100) is None
    # A bigger budget picks up where it stopped, never re-rating what the judge rated.
    more = judge_alias(db_sessions, adapter_id, _policy(f"{smollm2_vllm.url}/v1", budget_per_hour=20),
                       limit=100)
    assert more is not None and more.attempted == 2  # the 8 unrated minus the 6 judged
    assert len(_judge_rows(db_sessions, adapter_id)) == res.rated + more.rated


def test_a_judge_that_is_down_stops_the_sweep_with_a_reason(db_sessions, make_alias, tenant):
    alias = make_alias(tenant)
    adapter_id = _adapter_id(db_sessions, tenant, alias)
    seed_interactions(db_sessions, tenant, alias, None, 5)
    t0 = time.monotonic()
    res = judge_alias(db_sessions, adapter_id,
                      _policy(f"http://127.0.0.1:{free_port()}/v1", budget_per_hour=50), limit=5)
    assert time.monotonic() - t0 < 10
    assert res.attempted == 1 and res.rated == 0 and dict(res.skipped) == {"unreachable": 1}
    assert "unreachable" in res.stopped
    assert _judge_rows(db_sessions, adapter_id) == []
    with session_scope(db_sessions) as s:
        sweep = s.scalars(select(JudgeSweep).where(JudgeSweep.adapter_id == adapter_id)).one()
        assert sweep.skipped_reasons == {"unreachable": 1} and "unreachable" in sweep.stopped


def test_garbage_is_skipped_per_answer_and_a_slow_judge_times_out(db_sessions, make_alias, tenant,
                                                                 fake_judge):
    alias = make_alias(tenant)
    adapter_id = _adapter_id(db_sessions, tenant, alias)
    seed_interactions(db_sessions, tenant, alias, None, 3)
    url, garbage = fake_judge("garbage")
    res = judge_alias(db_sessions, adapter_id, _policy(url, retries=2), limit=3)
    assert res.attempted == 3 and dict(res.skipped) == {"unparseable": 3} and res.stopped is None
    assert garbage.calls == 9  # each answer tried three times
    url, slow = fake_judge("slow")
    res = judge_alias(db_sessions, adapter_id, _policy(url, retries=0, timeout_s=0.3), limit=3)
    assert dict(res.skipped) == {"timeout": 1} and "timeout" in res.stopped and slow.calls == 1
    assert _judge_rows(db_sessions, adapter_id) == []


def test_one_sweep_per_alias_at_a_time(smollm2_vllm, db_sessions, make_alias, tenant):
    alias = make_alias(tenant)
    adapter_id = _adapter_id(db_sessions, tenant, alias)
    seed_interactions(db_sessions, tenant, alias, None, 2)
    with db_sessions() as other:
        other.execute(text("SELECT pg_advisory_lock(hashtextextended(:k, 0))"),
                      {"k": f"flywheel.judge:{adapter_id}"})
        assert judge_alias(db_sessions, adapter_id, _policy(f"{smollm2_vllm.url}/v1"), limit=2) is None
        other.execute(text("SELECT pg_advisory_unlock(hashtextextended(:k, 0))"),
                      {"k": f"flywheel.judge:{adapter_id}"})
    assert judge_alias(db_sessions, adapter_id, _policy(f"{smollm2_vllm.url}/v1"), limit=2) is not None


def test_judge_ratings_start_no_run_unless_the_policy_counts_them(smollm2_vllm, db_sessions, make_alias,
                                                                  tenant):
    alias = make_alias(tenant)
    adapter_id = _adapter_id(db_sessions, tenant, alias)
    seed_interactions(db_sessions, tenant, alias, None, 4)
    res = judge_alias(db_sessions, adapter_id, _policy(f"{smollm2_vllm.url}/v1"), limit=4)
    assert res.rated >= 3, res.as_dict()
    trigger = TriggerPolicy(min_new_ratings=3)
    with session_scope(db_sessions) as s:
        assert start_run_if_due(s, adapter_id, Policy(trigger=trigger)) is None
    counting = Policy(trigger=trigger, judge=JudgePolicy(counts_toward_trigger=True))
    with session_scope(db_sessions) as s:
        run_id = start_run_if_due(s, adapter_id, counting)
    assert run_id is not None
    with session_scope(db_sessions) as s:
        run = s.get(TrainingRun, run_id)
        assert run.trigger["new_ratings"] == res.rated
        s.delete(run)  # no worker here: leave nothing active behind


def test_agreement_and_judge_ratings_are_shown_apart(smollm2_vllm, api, client, db_sessions, make_alias,
                                                     make_key, tenant):
    alias = make_alias(tenant)
    adapter_id = _adapter_id(db_sessions, tenant, alias)
    ops, product = make_key(tenant, "ops"), make_key(tenant, "product")
    ids = seed_interactions(db_sessions, tenant, alias, None, 6,
                            prompt="Can I return shoes after {i} days?", answer="Yes, within 30.")
    _human(db_sessions, tenant, adapter_id, ids[:4], ["up", "up", "down", "up"])
    # Calibration only: the judge spends its budget on answers humans rated.
    res = judge_alias(db_sessions, adapter_id, _policy(f"{smollm2_vllm.url}/v1", calibration_share=1.0),
                      limit=4)
    assert res.calibration == res.rated >= 3, res.as_dict()

    view = client.get(f"/v1/adapters/{alias}/judge", headers=bearer(ops))
    assert view.status_code == 200, view.text
    v = view.json()
    assert v["ratings"]["human"] == {"up": 3, "down": 1}
    assert sum(v["ratings"]["judge"].values()) == res.rated
    a = v["agreement"]
    assert a["pairs"] == res.rated and 0 <= a["agree"] <= a["pairs"]
    with session_scope(db_sessions) as s:
        judged = dict(s.execute(select(Feedback.interaction_id, Feedback.rating).where(
            Feedback.adapter_id == adapter_id, Feedback.source == "judge")).all())
    human = dict(zip(ids[:4], ["up", "up", "down", "up"], strict=True))
    assert a["agree"] == sum(judged[uuid.UUID(i)] == human[i] for i in ids[:4]
                             if uuid.UUID(i) in judged)
    assert v["used_last_hour"] == res.attempted and v["sweeps"][0]["rated"] == res.rated
    assert client.get(f"/v1/adapters/{alias}/judge", headers=bearer(product)).status_code == 403
    other = make_key(f"{tenant}-x", "ops")
    assert client.get(f"/v1/adapters/{alias}/judge", headers=bearer(other)).status_code == 404

    # The interaction shows which rating is whose; nobody may post as the judge.
    judged_id = str(next(iter(judged)))
    got = client.get(f"/v1/interactions/{judged_id}", headers=bearer(ops)).json()
    assert {f["source"] for f in got["feedback"]} == {"human", "judge"}
    r = client.post("/v1/feedback", headers=bearer(ops), json={
        "interaction_id": judged_id, "rating": "down", "rater_id": "judge:base"})
    assert r.status_code == 422 and "reserved" in r.text
    with session_scope(db_sessions) as s:
        n = s.scalar(select(func.count()).select_from(Feedback).where(
            Feedback.interaction_id == uuid.UUID(judged_id)))
    assert n == 2

    metrics = client.get("/metrics", headers=METRICS_AUTH).text
    line = f'flywheel_judge_agreement_pairs{{alias="{alias}",tenant="{tenant}"}} {res.rated}.0'
    assert line in metrics
    assert f'flywheel_ratings{{alias="{alias}",rating="up",source="human",tenant="{tenant}"}} 3.0' \
        in metrics
