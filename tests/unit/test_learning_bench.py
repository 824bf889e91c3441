"""The learning benchmark's pure parts: tasks and their splits, raters, intervals, verdicts."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys

import pytest

from bench.learning import raters
from bench.learning.__main__ import parse
from bench.learning.play import bad_candidates
from bench.learning.stats import bad_promotions, mean_ci, sign_test_p, summarize, t975
from service.tasks import TaskError, load_task
from tests.helpers.stack import REPO

SHIPPED = ("support_desk", "json_reply", "house_style")


def _texts(task, split, n=400, seed=3):
    return {c[-1]["content"] for c in task.prompts(split, n, random.Random(seed))}


def _phrasing_ngrams(text, n=4):
    words = re.findall(r"[a-z']+", text.lower())
    return {" ".join(words[k:k + n]) for k in range(len(words) - n + 1)}


@pytest.mark.parametrize("name", SHIPPED)
def test_test_prompts_share_no_prompt_and_no_phrasing_with_train(name):
    task = load_task(name)
    train, dev, test = (_texts(task, s) for s in ("train", "dev", "test"))
    assert train and dev and test
    assert not (test & train) and not (test & dev) and not (dev & train)
    train_grams = set().union(*(_phrasing_ngrams(t) for t in train))
    shared = {g for t in test for g in _phrasing_ngrams(t)} & train_grams
    assert not shared, sorted(shared)[:10]


@pytest.mark.parametrize("name", SHIPPED)
def test_the_wanted_answer_is_liked_and_a_plain_answer_is_not(name):
    task = load_task(name)
    rng = random.Random(0)
    for convo in task.prompts("test", 30, random.Random(1)):
        assert task.rate(convo, task.wanted(convo), rng) == (True, None)
        up, correction = task.rate(convo, "Sure, I can help with that.", random.Random(0))
        assert up is False and correction in (None, task.wanted(convo))


def test_prompts_refuse_an_unknown_split():
    for name in SHIPPED:
        with pytest.raises(ValueError, match="split must be one of"):
            load_task(name).prompts("validation", 2, random.Random(0))


@pytest.mark.parametrize("answer, ok", [
    ('{"reply": "Paris is the capital.", "lang": "en"}', True),
    ('  {"lang": "en", "reply": "Paris."}\n', True),
    ('```json\n{"reply": "Paris.", "lang": "en"}\n```', False),
    ('Here you go: {"reply": "Paris.", "lang": "en"}', False),
    ('{"reply": "Paris.", "lang": "en"} Anything else?', False),
    ('{"reply": "Paris.", "lang": "en", "extra": 1}', False),
    ('{"reply": "", "lang": "en"}', False),
    ('{"reply": "Paris.", "lang": "fr"}', False),
    ('["Paris", "en"]', False),
])
def test_json_reply_judges_the_whole_answer(answer, ok):
    assert load_task("json_reply").rate([{"role": "user", "content": "x"}], answer,
                                         random.Random(5))[0] is ok


def test_json_reply_wants_the_right_fact_for_test_questions():
    task = load_task("json_reply")
    wanted = json.loads(task.wanted([{"role": "user", "content": "How much is 7 times 8?"}]))
    assert wanted == {"reply": "7 times 8 is 56.", "lang": "en"}
    wanted = json.loads(task.wanted([{"role": "user", "content": "I need the capital of India, please."}]))
    assert wanted["reply"] == "The capital of India is New Delhi."


def test_a_task_file_that_misses_parts_is_refused(tmp_path):
    bad = tmp_path / "half_task.py"
    bad.write_text("NAME = 'half'\ndef prompts(split, n, rng):\n    return []\n")
    with pytest.raises(TaskError, match="does not define rate"):
        load_task(str(bad))
    with pytest.raises(TaskError, match="does not exist"):
        load_task(str(tmp_path / "missing.py"))
    with pytest.raises(TaskError, match="no task module"):
        load_task("no_such_task")


def test_a_task_file_is_loaded_by_path(tmp_path):
    spec = tmp_path / "echo_task.py"
    spec.write_text(
        "NAME = 'echo'\n"
        "def prompts(split, n, rng):\n    return [[{'role': 'user', 'content': split}]] * n\n"
        "def rate(messages, answer, rng):\n    return answer == 'ok', None if answer == 'ok' else 'ok'\n")
    task = load_task(str(spec))
    assert task.name == "echo" and task.wanted is None and task.max_tokens == 64
    assert task.rate([], "no", random.Random(0)) == (False, "ok")


# --- raters -------------------------------------------------------------------------------------


def test_raters_are_assigned_in_the_asked_shares():
    kinds = raters.assign(8, random_share=0.25, inverted_share=0.25, rng=random.Random(1))
    assert sorted(kinds).count(raters.RANDOM) == 2 and kinds.count(raters.INVERTED) == 2
    assert kinds.count(raters.HONEST) == 4
    assert raters.assign(8, random_share=0, inverted_share=0, rng=random.Random(1)) == [raters.HONEST] * 8
    with pytest.raises(ValueError, match="sum to at most 1"):
        raters.assign(8, random_share=0.6, inverted_share=0.6, rng=random.Random(1))


def test_inverted_raters_thumb_up_what_users_reject_and_random_ones_type_nothing():
    task = load_task("support_desk")
    convo = task.prompts("train", 1, random.Random(0))[0]
    good, bad = task.wanted(convo), "I do not know."
    assert raters.rate_as(raters.INVERTED, task, convo, bad, random.Random(0)) == (True, None)
    assert raters.rate_as(raters.INVERTED, task, convo, good, random.Random(0)) == (False, None)
    assert raters.rate_as(raters.HONEST, task, convo, good, random.Random(0)) == (True, None)
    votes = [raters.rate_as(raters.RANDOM, task, convo, good, random.Random(s)) for s in range(200)]
    assert all(c is None for _, c in votes) and 60 < sum(up for up, _ in votes) < 140
    with pytest.raises(ValueError, match="unknown rater kind"):
        raters.rate_as("sneaky", task, convo, good, random.Random(0))


# --- statistics and verdicts --------------------------------------------------------------------


def test_mean_ci_is_a_t_interval_over_seeds():
    s = mean_ci([0.5, 0.7, 0.9])
    assert s["mean"] == pytest.approx(0.7) and s["n"] == 3
    half = 4.303 * 0.2 / math.sqrt(3)
    assert s["ci95"] == pytest.approx([0.7 - half, 0.7 + half])
    assert mean_ci([0.4])["ci95"] is None and mean_ci([])["mean"] is None
    assert t975(2) == 4.303 and t975(12) == t975(10) and t975(100) == 1.96
    with pytest.raises(ValueError):
        t975(0)


def _round(k, *, promoted, before, after, cand=None, state=None, reasons=(), rolled=()):
    return {"round": k, "candidate": f"v{k}", "promoted": promoted,
            "state": state or ("live" if promoted else "rejected"),
            "gate": {"reasons": list(reasons)}, "rolled_back": list(rolled),
            "serving_before": {"rate": before}, "serving": {"rate": after},
            "candidate_test": {"rate": cand if cand is not None else after}}


def test_a_promotion_that_scores_below_what_it_replaced_is_a_bad_promotion():
    rounds = [_round(1, promoted=True, before=0.1, after=0.8),
              _round(2, promoted=False, before=0.8, after=0.8, cand=0.3, reasons=["nll up"]),
              _round(3, promoted=True, before=0.8, after=0.75),
              _round(4, promoted=False, before=0.75, after=0.8, cand=0.75, state="failed",
                     rolled=["v3"])]
    assert bad_promotions(0.1, rounds) == [{"round": 3, "version": "v3", "rate": 0.75,
                                            "replaced_rate": 0.8}]
    bad = bad_candidates(rounds)
    assert [(b["version"], b["stopped_by"]) for b in bad] == [
        ("v2", "gate: nll up"), ("v3", "promoted, then rolled back by the watch window")]


def test_summary_states_the_targets_met_and_missed():
    def run(seed, base, finals, oracle, icl):
        rounds = [dict(_round(k + 1, promoted=True, before=base if k == 0 else finals[k - 1],
                              after=f), icl={"rate": icl}) for k, f in enumerate(finals)]
        return {"task": "t", "arm": "clean", "seed": seed, "base": {"rate": base},
                "oracle": {"rate": oracle}, "rounds": rounds,
                "bad_promotions": bad_promotions(base, rounds)}

    good = summarize([run(s, 0.0, [0.5, 0.9], 1.0, 0.4) for s in range(3)])["t"]["clean"]
    assert good["gain_points"]["mean"] == pytest.approx(90) and good["promotions"] == 6
    assert good["targets"] == {"bad_promotions_0": True, "significant_bad_promotions_0": True,
                               "gain_30_points": True, "at_or_above_icl": True,
                               "80pct_of_oracle": True}
    weak = summarize([run(s, 0.0, [0.3, 0.2], 1.0, 0.5) for s in range(3)])["t"]["clean"]
    # Without per-prompt outcomes a drop cannot be shown to be chance: it counts as significant.
    assert weak["targets"] == {"bad_promotions_0": False, "significant_bad_promotions_0": False,
                               "gain_30_points": False, "at_or_above_icl": False,
                               "80pct_of_oracle": False}
    assert weak["bad_promotions"] == 3 and weak["significant_bad_promotions"] == 3


def test_the_sign_test_is_exact_and_one_sided():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(1, 0) == 0.5
    assert sign_test_p(5, 0) == pytest.approx(1 / 32)
    assert sign_test_p(4, 1) == pytest.approx(6 / 32)
    assert sign_test_p(0, 5) == 1.0
    assert sign_test_p(9, 3) == pytest.approx(sum(__import__("math").comb(12, k)
                                                  for k in range(9, 13)) / 4096)


def test_each_drop_is_listed_and_flagged_only_when_beyond_chance():
    def promoted(k, old, new):
        return {"round": k, "candidate": f"v{k}", "promoted": True,
                "serving_before": {"rate": sum(old) / len(old), "outcomes": old},
                "serving": {"rate": sum(new) / len(new), "outcomes": new}}

    one_prompt = promoted(1, [1, 1, 0, 0] * 6, [1, 0, 0, 0] + [1, 1, 0, 0] * 5)  # 12 -> 11 of 24
    collapse = promoted(2, [1] * 12 + [0] * 12, [0] * 24)  # 12 -> 0: a broken candidate
    bad = bad_promotions(0.0, [one_prompt, collapse])
    assert [(b["version"], b["lost"], b["gained"], b["significant"]) for b in bad] == [
        ("v1", 1, 0, False), ("v2", 12, 0, True)]
    assert bad[1]["p_value"] < 0.001
    summary = summarize([{"task": "t", "arm": "poisoned", "seed": 0, "base": {"rate": 0.0},
                          "oracle": None, "rounds": [one_prompt], "bad_promotions": bad[:1]}])
    s = summary["t"]["poisoned"]
    assert s["bad_promotions"] == 1 and s["significant_bad_promotions"] == 0
    assert s["targets"] == {"bad_promotions_0": False, "significant_bad_promotions_0": True}


# --- the command line ---------------------------------------------------------------------------


def test_the_command_line_refuses_bad_input_before_starting_anything(tmp_path, capsys):
    for argv, message in [
        (["--task", "nope"], "no task module 'nope'"),
        (["--task", "json_reply", "--random-raters", "0.7", "--inverted-raters", "0.5"],
         "summing to at most 1"),
        (["--task", "json_reply", "--rounds", "0"], "must be at least 1"),
        (["--task", "json_reply", "--first-seed", "-1"], "--first-seed at least 0"),
    ]:
        with pytest.raises(SystemExit) as exc:
            parse(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(SystemExit):
        parse(["--task", "json_reply", "--data-dir", str(full)])
    args = parse(["--task", "json_reply", "--model", "tiny"])
    assert args.per_round == 32 and args.seeds == 3 and args.split == "test" and args.first_seed == 0
    assert parse(["--task", "support_desk"]).per_round == 40


def test_the_task_reaches_training_only_through_the_api():
    """Nothing the worker runs imports a task or the benchmark."""
    for path in (REPO / "workers").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"service\.tasks|bench\.|service\.simulation", text), path
    r = subprocess.run([sys.executable, "-c", "import workers.tasks, sys; "
                        "print([m for m in sys.modules if m.startswith(('service.tasks', 'bench'))])"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_results_of_separate_commands_merge_into_one_summary(tmp_path):
    from bench.learning.merge import merge

    def doc(seeds):
        runs = [{"task": "t", "arm": "clean", "seed": s, "base": {"rate": 0.0}, "oracle": None,
                 "rounds": [dict(_round(1, promoted=True, before=0.0, after=0.5 + s / 10),
                                 icl={"rate": 0.2}, seconds={"round": 9.0})],
                 "bad_promotions": []} for s in seeds]
        return {"command": f"seeds {seeds}", "runs": runs}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(doc([0, 1])))
    b.write_text(json.dumps(doc([2])))
    merged = merge([a, b])
    assert merged["summary"]["t"]["clean"]["final"]["values"] == [0.5, 0.6, 0.7]
    assert "| t | clean | 3 |" in merged["table"]
    b.write_text(json.dumps(doc([1])))
    with pytest.raises(SystemExit, match="appears twice"):
        merge([a, b])
