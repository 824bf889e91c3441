"""The learning benchmark's one command, shortened to one round: a simulated product drives the
real stack (embedded Postgres + Redis, managed vLLM, API, Celery worker + beat) through trigger →
train → gate → swap, and the round is measured. Hitting the +30-point target is the benchmark's
job (BENCHMARKS.md), not CI's: this checks that a round completes and reports what it should."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers.stack import REPO


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_one_round_of_the_simulated_product_through_the_real_loop(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    out = tmp_path / "result.json"
    data = tmp_path / "data"
    r = subprocess.run(
        [sys.executable, "-m", "bench.sim_product", "--rounds", "1", "--per-round", "24",
         "--no-offline-score", "--data-dir", str(data), "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    result = json.loads(out.read_text())
    base, first = result["rounds"]
    assert base["round"] == 0 and base["serving"] == "base"
    assert base["heldout"]["n"] == 45 and 0.0 <= base["heldout"]["thumbs_up_rate"] <= 1.0

    # The users' traffic crossed the trigger and the real worker produced a gated candidate.
    assert first["traffic"]["chats"] == 24
    assert first["candidate"] == "demo--support-bot--v1" and first["method"] == "sft"
    assert first["state"] in ("live", "rejected"), first.get("failure_reason")
    assert isinstance(first["gate"]["passed"], bool)
    assert first["gate"]["golden"], "the golden suite ran through vLLM"
    if first["gate"]["passed"]:
        assert first["promoted"] and first["serving"] == "demo--support-bot--v1"
        assert first["heldout"]["served"] == {"demo--support-bot--v1": 45}
    else:
        assert first["gate"]["reasons"] and first["serving"] == "base"
    assert 0.0 <= first["heldout"]["thumbs_up_rate"] <= 1.0
    assert first["training"]["steps"] == 100
    for phase in ("traffic", "train", "gate", "measure", "round"):
        assert first["seconds"][phase] >= 0, phase
    assert "no_bad_candidate_promoted" in result["summary"]

    # The markdown table has round 0 and round 1.
    assert re.search(r"^\| 0 \| base \|", result["table"], re.M)
    assert re.search(r"^\| 1 \| ", result["table"], re.M)
    assert "| round | serving | held-out thumbs-up |" in r.stdout
    # Everything the benchmark started has stopped again, and its data dir is gone.
    leftovers = subprocess.run(["pgrep", "-f", str(data)], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", leftovers
    assert not data.exists()


def test_the_rater_is_hidden_from_the_training_code():
    """Nothing the worker runs can read the hidden rule: no module under workers/ mentions the
    simulation, and within service/ only the demo imports it."""
    for path in (REPO / "workers").rglob("*.py"):
        text = path.read_text()
        assert "simulation" not in text and "HiddenRater" not in text, path
    importers = {p.name for p in (REPO / "service").rglob("*.py")
                 if re.search(r"^\s*(from|import) service\.simulation", p.read_text(), re.M)}
    assert importers <= {"demo.py"}, importers
