"""`flywheel demo` with nothing configured: the README's main job, through embedded Postgres and
Redis, a real Celery worker and a real vLLM process, exits 0 after the whole loop."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from workers.export import llama_cpp_available

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_demo_completes_the_loop_on_a_bare_configuration(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(FLYWHEEL_DATA_DIR=str(tmp_path / "data"), COLUMNS="160")
    r = subprocess.run([sys.executable, "-m", "service.cli", "demo"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1200)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    for step in ("starting embedded Postgres and Redis", "starting a managed vLLM", "threshold crossed",
                 "gate passed", "ops approve", "hot-swapped demo--support-bot--v1", "edge export",
                 "Flywheel demo"):
        assert step in out, (step, out[-4000:])
    if llama_cpp_available():  # else the export is an error that says llama.cpp is missing
        assert "export passed" in out and "ollama create support-bot -f" in out, out[-4000:]
        modelfile = next((tmp_path / "data" / "demo" / "artifacts" / "exports").glob(
            "*/gguf-q8_0/Modelfile"))
        assert modelfile.read_text().startswith("FROM ./model.gguf")
    # Everything the demo started has stopped again.
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", leftovers
