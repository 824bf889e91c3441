"""The gate's verdict and the watch window's judgement, as pure functions."""

from __future__ import annotations

import pytest

from service.domain.policy import GatePolicy, GoldenCase, WatchPolicy
from workers.gate import check_golden_output, decide
from workers.watch import RateComparison, judge

GOOD = {"reference": "the serving version", "n_heldout": 9, "preference_accuracy": 0.8,
        "n_preference": 10, "nll_candidate": 2.0, "nll_reference": 2.1, "n_nll": 8}


def test_a_better_candidate_passes_with_notes_for_what_was_not_measured():
    verdict = decide(GatePolicy(min_preference_accuracy=0.6), GOOD, None)
    assert verdict.passed and verdict.reasons == []
    assert any("golden" in n for n in verdict.notes)


def test_each_failed_criterion_is_explained():
    metrics = {**GOOD, "preference_accuracy": 0.3, "nll_candidate": 2.5}
    golden = [{"prompt": "2+2?", "passed": False, "failures": ["missing '4'"]},
              {"prompt": "hi", "passed": True, "failures": []}]
    verdict = decide(GatePolicy(min_preference_accuracy=0.6, max_nll_regression=0.05,
                                golden=[GoldenCase(prompt="2+2?", must_contain=["4"])]), metrics, golden)
    assert not verdict.passed
    assert len(verdict.reasons) == 3
    assert "preference accuracy 0.30" in verdict.reasons[0] and "0.60" in verdict.reasons[0]
    assert "NLL" in verdict.reasons[1] and "2.100" in verdict.reasons[1] and "2.500" in verdict.reasons[1]
    assert "golden case '2+2?' failed: missing '4'" == verdict.reasons[2]


def test_nll_within_tolerance_passes():
    assert decide(GatePolicy(max_nll_regression=0.05), {**GOOD, "nll_candidate": 2.2}, None).passed
    assert not decide(GatePolicy(max_nll_regression=0.01), {**GOOD, "nll_candidate": 2.2}, None).passed


def test_near_zero_nll_uses_the_absolute_slack():
    tiny = {**GOOD, "nll_reference": 0.063, "nll_candidate": 0.075}  # +19% but +0.012 nats
    assert decide(GatePolicy(max_nll_regression=0.05, max_nll_regression_abs=0.02), tiny, None).passed
    assert not decide(GatePolicy(max_nll_regression=0.05, max_nll_regression_abs=0.005), tiny, None).passed


def test_golden_checks():
    case = GoldenCase(prompt="p", must_contain=["ship"], must_not_contain=["sorry"], regex=r"\d+ days",
                      json_valid=False)
    assert check_golden_output(case, "we ship in 3 days") == []
    failures = check_golden_output(case, "sorry, soon")
    assert failures == ["missing 'ship'", "contains forbidden 'sorry'", r"does not match /\d+ days/"]
    assert check_golden_output(GoldenCase(prompt="p", json_valid=True), "{oops") == ["is not valid JSON"]
    assert check_golden_output(GoldenCase(prompt="p", json_valid=True), '{"a": 1}') == []


WATCH = WatchPolicy(window_minutes=60, min_samples=30, max_drop=0.1, alpha=0.05)


def test_a_clear_drop_rolls_back_with_the_numbers():
    d = judge(RateComparison(new_up=5, new_n=40, prev_up=30, prev_n=50), WATCH, window_over=False)
    assert d.action == "rollback"
    assert "12%" in d.reason and "60%" in d.reason and "p = " in d.reason


@pytest.mark.parametrize("cmp, over, action", [
    (RateComparison(1, 10, 30, 50), False, "wait"),  # too few samples yet
    (RateComparison(1, 10, 30, 50), True, "keep"),  # window closed without enough evidence
    (RateComparison(26, 40, 30, 50), False, "wait"),  # 65% vs 60%: not worse
    (RateComparison(26, 40, 30, 50), True, "keep"),
    (RateComparison(21, 40, 30, 50), False, "wait"),  # a 7.5-point drop is within max_drop
    (RateComparison(10, 40, 0, 0), True, "keep"),  # nothing to compare with
])
def test_no_rollback_without_significant_drop(cmp, over, action):
    assert judge(cmp, WATCH, window_over=over).action == action


def test_p_value_is_small_for_a_large_drop_and_large_for_none():
    assert RateComparison(5, 100, 60, 100).p_value_worse() < 1e-6
    assert RateComparison(60, 100, 60, 100).p_value_worse() == pytest.approx(0.5)


def test_answers_further_from_the_corrections_than_the_serving_versions_are_rejected():
    from workers.answer_check import compare

    wanted = "Hello from Globex! Your order ships today. Have a nice day!"
    rows = [("Hello from Globex! It ships today. Have a nice day!", "It ships today.", wanted),
            ("It ships.", "Hello from Globex! Your order ships today.", wanted),
            ("no idea", "no clue", wanted),  # both share nothing with it: a tie
            ("Hello from Globex! Shipping today.", "Shipping today.", wanted)]
    m = compare(rows)
    assert (m["answer_wins"], m["answer_losses"], m["answer_ties"], m["n_answers"]) == (2, 1, 1, 4)
    assert m["answer_win_rate"] == pytest.approx(2 / 3)
    gate = GatePolicy(min_answer_win_rate=0.5)
    assert decide(gate, {**GOOD, **m}, None).passed
    worse = compare([(b, a, w) for a, b, w in rows])
    verdict = decide(gate, {**GOOD, **worse}, None)
    assert not verdict.passed and len(verdict.reasons) == 1
    assert "closer to the correction than the serving version's on 1, further on 2" in verdict.reasons[0]
    assert "win rate 0.33, below the policy minimum 0.50" in verdict.reasons[0]
    # Not gated unless the policy says so; undecided or unmeasured answers are a note, not a pass
    # by silence.
    assert decide(GatePolicy(), {**GOOD, **worse}, None).passed
    ties = compare([("x", "x", wanted)])
    assert ties["answer_win_rate"] is None
    assert any("tied" in n for n in decide(gate, {**GOOD, **ties}, None).notes)
    assert any("answers not compared" in n for n in decide(gate, GOOD, None).notes)


def test_answer_similarity_is_by_words_in_order_and_ignores_case():
    from workers.answer_check import similarity

    assert similarity("Have a nice day!", "have a NICE day !") == 1.0
    assert similarity("", "") == 1.0 and similarity("abc", "") == 0.0
    assert similarity("day nice a have", "have a nice day") < similarity("have a nice", "have a nice day")


def test_a_candidate_is_promoted_only_on_evidence():
    nothing = {"reference": "base", "n_heldout": 0}
    verdict = decide(GatePolicy(), nothing, None)
    assert not verdict.passed and verdict.reasons[0].startswith("unmeasured: no held-out rating")
    assert "allow_unmeasured" in verdict.reasons[0]
    allowed = decide(GatePolicy(allow_unmeasured=True), nothing, None)
    assert allowed.passed and any("allow_unmeasured" in n for n in allowed.notes)
    # Golden cases count as evidence, and so do scored held-out ratings, against min_evidence.
    golden = [{"prompt": "hi", "passed": True, "failures": []}]
    assert decide(GatePolicy(golden=[GoldenCase(prompt="hi")]), nothing, golden).passed
    few = decide(GatePolicy(min_evidence=5), {**GOOD, "n_heldout": 3}, golden)
    assert not few.passed and few.reasons == [
        "too little evidence: 4 measurements (held-out ratings scored + golden cases), below the "
        "policy minimum 5"]
    assert decide(GatePolicy(min_evidence=5), {**GOOD, "n_heldout": 5}, None).passed


def test_the_generic_golden_checks_need_no_knowledge_of_the_task():
    case = GoldenCase(prompt="Hello!", non_empty=True, no_template_tokens=True, max_repetition=0.5)
    assert check_golden_output(case, "Hi! I'm doing well, thanks for asking. How can I help?") == []
    assert check_golden_output(case, "  \n") == ["is empty"]
    assert check_golden_output(case, "Sure<|im_end|>\n<|im_start|>user") == [
        "leaks chat-template markup <|im_end|>, <|im_start|>"]
    assert check_golden_output(case, "[INST] hi [/INST]") == ["leaks chat-template markup [/INST], [INST]"]
    loop = "I am fine. " * 12
    assert check_golden_output(case, loop)[0].startswith("repeats itself: 91% of its word 3-grams")
    assert check_golden_output(GoldenCase(prompt="x"), loop) == []  # off unless asked


def test_the_shipped_default_policy_has_a_generic_golden_suite_and_wants_evidence():
    from service.domain.policy import PolicyStore
    from tests.helpers.stack import REPO

    gate = PolicyStore(REPO / "policies").for_alias("any-alias", "any").gate
    assert len(gate.golden) >= 2 and not gate.allow_unmeasured and gate.min_evidence >= 1
    assert all(c.non_empty and c.no_template_tokens and c.max_repetition for c in gate.golden)
    assert gate.min_answer_win_rate == 0.5
