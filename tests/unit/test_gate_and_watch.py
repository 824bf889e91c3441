"""The gate's verdict and the watch window's judgement, as pure functions."""

from __future__ import annotations

import pytest

from service.policy import GatePolicy, GoldenCase, WatchPolicy
from workers.gate import check_golden_output, decide
from workers.watch import RateComparison, judge

GOOD = {"reference": "the serving version", "preference_accuracy": 0.8, "n_preference": 10,
        "nll_candidate": 2.0, "nll_reference": 2.1, "n_nll": 8}


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
