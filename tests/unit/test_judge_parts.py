"""The AI judge's parts that need no server: its policy, its client against a fake endpoint
(transport-level, so retries and timeouts are httpx's own), sampling arithmetic, the dataset's
caps on its ratings, and the agreement figure. tests/integration/test_judge.py runs it for real."""

from __future__ import annotations

import dataclasses
import json
import random

import httpx
import pytest
from pydantic import ValidationError

from service.api.schemas import FeedbackRequest
from service.domain.judge_stats import agreement, endpoint, wilson
from service.domain.policy import JudgePolicy, Policy
from tests.helpers.datasets import build, ri
from workers.dataset import is_heldout
from workers.judge import Candidate, batches, per_sweep_limit, split_budget
from workers.judge_client import JudgeClient, JudgeFailed, Verdict, parse

CHAT = [{"role": "user", "content": "How do I reset my password?"}]


def policy(**kw) -> JudgePolicy:
    return JudgePolicy(**{"url": "http://judge.test/v1", "model": "j", "backoff_s": 0.0,
                          "retries": 2, **kw})


def reply(content: str, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json={"choices": [{"message": {"content": content}}]})


class Endpoint:
    """A scripted judge: answers in turn, recording each request body."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.bodies: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.content))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer if isinstance(answer, httpx.Response) else reply(answer)


def client(ep: Endpoint, **kw) -> JudgeClient:
    return JudgeClient(policy(**kw), transport=httpx.MockTransport(ep))


# --- policy -----------------------------------------------------------------------------------

def test_a_judge_needs_url_and_model_and_is_off_by_default() -> None:
    assert not Policy().judge.enabled
    with pytest.raises(ValidationError, match="both url and model"):
        JudgePolicy(url="http://judge:8000/v1")
    with pytest.raises(ValidationError, match="url"):
        JudgePolicy(url="judge:8000", model="m")
    assert JudgePolicy(url="http://judge:8000/v1", model="m").enabled
    assert not JudgePolicy(url="http://judge:8000/v1", model="m", budget_per_hour=0).enabled
    with pytest.raises(ValidationError, match="max_share"):
        JudgePolicy(max_share=1.0)


def test_nobody_may_rate_as_the_judge() -> None:
    with pytest.raises(ValidationError, match="reserved for the AI judge"):
        FeedbackRequest(interaction_id="00000000-0000-4000-8000-000000000001", rating="up",
                        rater_id="JUDGE:gpt")
    ok = FeedbackRequest(interaction_id="00000000-0000-4000-8000-000000000001", rating="up",
                         rater_id="judged-by-alice")
    assert ok.rater_id == "judged-by-alice"


def test_the_endpoint_shown_to_ops_has_no_credentials_or_path() -> None:
    assert endpoint("https://user:secret@judge.example.com:8443/v1?key=abc") == \
        "https://judge.example.com:8443"
    assert endpoint(None) is None


# --- client -----------------------------------------------------------------------------------

def test_a_verdict_is_read_from_json_even_inside_a_code_fence() -> None:
    ep = Endpoint('Sure!\n```json\n{"verdict": "down", "reason": "it ignores the question"}\n```')
    with client(ep) as c:
        r = c.rate_one(CHAT, "Bananas are yellow.")
    assert (r.rating, r.reason) == ("down", "it ignores the question")
    body = ep.bodies[0]
    assert body["model"] == "j" and body["temperature"] == 0
    assert body["response_format"]["type"] == "json_schema"
    assert "Bananas are yellow." in body["messages"][1]["content"]
    assert "reset my password" in body["messages"][1]["content"]


def test_structured_output_can_be_turned_off_for_endpoints_without_it() -> None:
    ep = Endpoint('{"verdict": "up"}')
    with client(ep, structured=False) as c:
        assert c.rate_one(CHAT, "Use the link.").rating == "up"
    assert "response_format" not in ep.bodies[0]


def test_garbage_is_retried_then_skipped_as_unparseable() -> None:
    ep = Endpoint("I think it is fine", '{"verdict": "maybe"}', "nope")
    with client(ep, retries=2) as c, pytest.raises(JudgeFailed) as err:
        c.rate_one(CHAT, "x")
    assert err.value.reason == "unparseable" and not err.value.unreachable
    assert len(ep.bodies) == 3


def test_a_server_error_is_retried_and_a_later_verdict_counts() -> None:
    ep = Endpoint(httpx.Response(503, text="loading"), httpx.Response(429, text="slow down"),
                  '{"verdict": "up", "reason": "ok"}')
    with client(ep, retries=2) as c:
        assert c.rate_one(CHAT, "x").rating == "up"
    assert len(ep.bodies) == 3


def test_a_refused_request_is_not_retried() -> None:
    ep = Endpoint(httpx.Response(404, text="model j does not exist"))
    with client(ep, retries=3) as c, pytest.raises(JudgeFailed) as err:
        c.rate_one(CHAT, "x")
    assert err.value.reason == "http_404" and "does not exist" in err.value.detail
    assert len(ep.bodies) == 1


def test_an_unreachable_or_slow_judge_says_so() -> None:
    for exc, reason in ((httpx.ConnectError("refused"), "unreachable"),
                        (httpx.ReadTimeout("slow"), "timeout")):
        ep = Endpoint(exc)
        with client(ep, retries=1) as c, pytest.raises(JudgeFailed) as err:
            c.rate_one(CHAT, "x")
        assert err.value.reason == reason and err.value.unreachable
        assert len(ep.bodies) == 2


def test_a_ranking_maps_scores_to_thumbs_by_the_threshold() -> None:
    ep = Endpoint(json.dumps({"scores": [{"answer": 2, "score": 0.9, "reason": "best"},
                                         {"answer": 1, "score": 0.2, "reason": "vague"},
                                         {"answer": 3, "score": 0.6}]}))
    with client(ep, mode="relative", up_threshold=0.6) as c:
        got = c.rank_group(CHAT, ["a", "b", "c"])
    assert [(r.rating, r.score) for r in got] == [("down", 0.2), ("up", 0.9), ("up", 0.6)]
    assert "Answer 3:\nc" in ep.bodies[0]["messages"][1]["content"]


def test_a_ranking_that_leaves_an_answer_out_is_unusable() -> None:
    ep = Endpoint(json.dumps({"scores": [{"answer": 1, "score": 0.9}]}))
    with client(ep, mode="relative", retries=0) as c, pytest.raises(JudgeFailed) as err:
        c.rank_group(CHAT, ["a", "b"])
    assert err.value.reason == "unparseable"


def test_parse_refuses_what_is_not_a_verdict() -> None:
    with pytest.raises(ValueError):
        parse(Verdict, "")
    with pytest.raises(ValueError):
        parse(Verdict, '{"verdict": "UP!"}')


# --- sampling ---------------------------------------------------------------------------------

def test_the_budget_is_spread_over_the_hours_sweeps() -> None:
    assert per_sweep_limit(policy(budget_per_hour=60), 60) == 1
    assert per_sweep_limit(policy(budget_per_hour=600), 60) == 10
    assert per_sweep_limit(policy(budget_per_hour=1), 60) == 1


def test_calibration_gets_its_share_on_average_even_one_at_a_time() -> None:
    rng = random.Random(0)
    got = sum(split_budget(1, 0.1, rng) for _ in range(5000))
    assert 400 <= got <= 600  # Binomial(5000, 0.1): mean 500, sd 21
    assert split_budget(10, 0.3, rng) == 3
    assert split_budget(4, 1.0, rng) == 4 and split_budget(4, 0.0, rng) == 0


def test_relative_mode_groups_answers_to_one_prompt() -> None:
    def cand(i: int, prompt: str) -> Candidate:
        return Candidate(id=i, messages=[{"role": "user", "content": prompt}], answer=f"a{i}",
                         version_id=None, calibration=False)

    items = [cand(1, "p"), cand(2, "q"), cand(3, "p"), cand(4, "p"), cand(5, "p"), cand(6, "p")]
    groups = batches(items, policy(mode="relative", group_size=4))
    assert sorted([c.id for c in g] for g in groups) == [[1, 3, 4, 5], [2], [6]]
    assert all(len(g) == 1 for g in batches(items, policy()))


# --- the dataset ------------------------------------------------------------------------------

def judged(i: int, **kw):
    return dataclasses.replace(ri(i, **kw), rater_id="judge:j", source="judge")


def test_judge_ratings_are_capped_to_their_share_of_the_training_set() -> None:
    human = [ri(i, response=f"good answer {i}") for i in range(30)]
    judge = [judged(100 + i, response=f"judged answer {i}") for i in range(40)]
    d = build(human + judge, method="sft", max_judge_share=0.25)
    assert d.stats["judge_items"] == 10  # 10 of 40 train: a quarter
    assert d.stats["dropped_judge_cap"] == 30
    none = build(human + judge, method="sft", max_judge_share=0.0)
    assert none.stats["judge_items"] == 0 and none.stats["sft_train"] == 30


def test_a_human_rating_wins_over_the_judges_and_judge_ratings_are_never_held_out() -> None:
    human = [ri(i, response=f"good answer {i}") for i in range(40)]
    judge = [judged(i, response=f"good answer {i}", rating="down") for i in range(5)]
    judge += [judged(200 + i, response=f"other answer {i}") for i in range(60)]
    d = build(human + judge, method="auto", max_judge_share=0.5, heldout_fraction=0.2)
    assert d.stats["dropped_judge_overridden"] == 5
    judge_ids = {j.interaction_id for j in judge}
    held = set(d.snapshot.heldout_ids)
    assert held and not held & judge_ids
    heldout_judged = sum(is_heldout(j.interaction_id, 0.2) for j in judge[5:])
    assert d.stats["dropped_judge_heldout"] == heldout_judged > 0
    only_judged = {j.interaction_id for j in judge[5:]}
    assert len(only_judged & set(d.snapshot.interaction_ids)) == d.stats["judge_items"] > 0


def test_the_judge_is_not_a_rater_the_human_cap_counts() -> None:
    humans = [ri(i, response=f"good answer {i}", rater=f"user-{i % 3}") for i in range(12)]
    judge = [judged(100 + i, response=f"judged answer {i}") for i in range(4)]
    d = build(humans + judge, method="sft", max_rater_share=0.5, max_judge_share=0.25)
    assert d.stats["dropped_rater_cap"] == 0  # three raters of four items each
    assert d.stats["judge_items"] == 4


# --- agreement --------------------------------------------------------------------------------

def test_agreement_and_kappa_on_a_worked_example() -> None:
    # 20 up/up, 5 up/down, 10 down/up, 15 down/down: agree 35/50; chance 0.5*0.6+0.5*0.4=0.5.
    pairs = [("up", "up")] * 20 + [("up", "down")] * 5 + [("down", "up")] * 10 + \
            [("down", "down")] * 15
    a = agreement(pairs)
    assert (a["pairs"], a["agree"]) == (50, 35)
    assert a["rate"] == pytest.approx(0.7) and a["kappa"] == pytest.approx(0.4)
    assert a["judge_up_rate"] == pytest.approx(0.5) and a["human_up_rate"] == pytest.approx(0.6)
    lo, hi = a["interval"]
    assert lo < 0.7 < hi and hi - lo < 0.3


def test_agreement_without_pairs_or_variation_claims_nothing() -> None:
    assert agreement([])["rate"] is None and agreement([])["interval"] is None
    assert agreement([("up", "up")] * 5)["kappa"] is None  # chance explains it all
    assert wilson(0, 0) is None and wilson(5, 5)[1] == 1.0
