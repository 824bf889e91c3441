"""CI's guard on learning: the learning benchmark on the tiny model, one fixed seed, through the
real stack (embedded Postgres + Redis, managed vLLM, API, Celery worker + beat).

The clean arm must raise the test thumbs-up rate by a margin a working loop clears easily (a
broken dataset, trainer, gate or swap leaves it at the base's 0%); the poisoned arm (a quarter
of the raters voting at random, a quarter inverting their votes) must promote nothing that
scores below what it replaced by more than chance. The real-model numbers are BENCHMARKS.md §1's job."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.stack import REPO

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

# The base answers 0% and a broken loop stays there. Working loops (BENCHMARKS §1, 3 seeds, 48
# test prompts): round 1 alone reached 15-29%, three rounds ended at 29-67%.
MIN_GAIN = 0.10


@pytest.mark.timeout(1500)
def test_the_loop_learns_on_held_out_prompts_and_poisoned_raters_promote_nothing_worse(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    out, data = tmp_path / "result.json", tmp_path / "data"
    r = subprocess.run(
        [sys.executable, "-m", "bench.learning", "--task", "house_style", "--model", "tiny",
         "--seeds", "1", "--rounds", "3", "--test-n", "48", "--arms", "clean", "poisoned",
         "--no-oracle",
         "--data-dir", str(data), "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1400)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    result = json.loads(out.read_text())
    clean, poisoned = (next(x for x in result["runs"] if x["arm"] == arm) for arm in ("clean", "poisoned"))

    # Every version of the seed answered the same 48 test prompts.
    assert clean["base"]["n"] == 48 and clean["oracle"] is None  # the oracle is not CI's job
    candidates = {row["candidate"] for run in (clean, poisoned) for row in run["rounds"]}
    assert len(clean["base"]["served"]) == 1 and not set(clean["base"]["served"]) & candidates
    for row in clean["rounds"] + poisoned["rounds"]:
        assert row["serving"]["n"] == 48 and row["icl"]["n"] == 48 and row["icl"]["shots"] == 4
        assert row["traffic"]["chats"] == 32 and row["method"] == "sft"
        for stage in ("traffic", "dataset", "train", "gate", "measure", "round"):
            assert row["seconds"][stage] >= 0, (stage, row["seconds"])

    # Learning: the clean arm ends well above the base, served by a version the loop promoted.
    final = clean["rounds"][-1]
    assert final["serving"]["rate"] - clean["base"]["rate"] >= MIN_GAIN, (clean["base"], final)
    assert any(row["promoted"] for row in clean["rounds"])
    assert set(final["serving"]["served"]) <= {row["candidate"] for row in clean["rounds"]}

    # Poisoning: no promoted version scores below what it replaced beyond chance (a one-sided
    # exact sign test on the prompts the two versions disagree on: a drop of one prompt in 48 is
    # listed but is not evidence; a collapse is); the votes really were mixed.
    bad = poisoned["bad_promotions"]
    assert all("p_value" in b for b in bad), bad
    assert [b for b in bad if b["significant"]] == [], bad
    assert sorted(poisoned["raters"]).count("inverted") == 2 and poisoned["raters"].count("random") == 2
    assert sum(row["traffic"].get("inverted_votes", 0) for row in poisoned["rounds"]) > 0
    summary = result["summary"]["house_style"]
    assert summary["poisoned"]["targets"]["significant_bad_promotions_0"] is True
    assert summary["clean"]["gain_points"]["mean"] >= 100 * MIN_GAIN
    assert "| house_style | clean | 1 |" in result["table"]

    # Everything the benchmark started has stopped again, and its data dir is gone.
    leftovers = subprocess.run(["pgrep", "-f", str(data)], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", leftovers
    assert not data.exists()
