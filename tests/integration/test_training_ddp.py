"""The training CLI as a worker runs it: DDP under `accelerate launch`, and a kill -9 mid-run.

- `accelerate launch` DDP training on CPU (2 processes, gloo) writes exactly one valid artifact.
- `python -m workers.training` SIGKILLed after a checkpoint resumes from it when run again.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.engine.artifact import verify_artifact
from service.local.embedded import free_port
from tests.helpers.datasets import addition_records
from workers.training import latest_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DDP_CONFIG = REPO / "workers" / "accelerate" / "ddp_cpu.yaml"


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _write_spec(tmp_path: Path, tiny_model: Path, **config) -> Path:
    from transformers import AutoTokenizer

    _write_jsonl(tmp_path / "train.jsonl", addition_records(AutoTokenizer.from_pretrained(tiny_model)))
    spec = {
        "base_model_dir": str(tiny_model),
        "data": {"train": str(tmp_path / "train.jsonl")},
        "config": {"method": "sft", "learning_rate": 1e-3, **config},
        "out_dir": str(tmp_path / "out" / "v1"),
        "work_dir": str(tmp_path / "work"),
        "lineage": {"version": "v1"},
        "result_path": str(tmp_path / "result.json"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    return tmp_path / "spec.json"


def test_accelerate_ddp_on_cpu_trains_one_artifact(tiny_model, tmp_path):
    _write_spec(tmp_path, tiny_model, max_steps=4, per_device_batch_size=2, checkpoint_every_steps=2)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = [*accelerate, "--config_file", str(DDP_CONFIG), "--main_process_port", str(free_port()),
           "-m", "workers.training", "--spec", str(tmp_path / "spec.json")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    result = json.loads((tmp_path / "result.json").read_text())
    metrics = result["metrics"]
    assert metrics["world_size"] == 2 and metrics["backend"] == "gloo"
    # 2 processes x batch 2 x 4 steps = one pass over the 16 records.
    assert metrics["steps"] == 4 and metrics["epoch"] == pytest.approx(1.0)
    out = tmp_path / "out"
    assert [p.name for p in out.iterdir()] == ["v1"]
    verify_artifact(out / "v1", expected_sha256=result["sha256"], engine_base_model=str(tiny_model),
                    max_lora_rank=16)
    assert sorted(p.name for p in (out / "v1").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "lineage.json"]
    # Both ranks checkpointed their RNG state: it really ran as two processes.
    ckpt = tmp_path / "work" / "checkpoints" / "checkpoint-4"
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in ckpt.iterdir()}
    progress = [json.loads(line)["progress"] for line in proc.stderr.splitlines()
                if line.startswith('{"progress"')]
    assert [p["step"] for p in progress] == [1, 2, 3, 4]  # reported once, by the main process


def test_killed_training_resumes_from_its_checkpoint(tiny_model, tmp_path):
    spec = _write_spec(tmp_path, tiny_model, max_steps=60, per_device_batch_size=2, checkpoint_every_steps=4)
    cmd = [sys.executable, "-m", "workers.training", "--spec", str(spec)]
    ckpts = tmp_path / "work" / "checkpoints"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(ckpts) is None or latest_checkpoint(ckpts).name == "checkpoint-4":
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup, no atexit: like an OOM kill
        proc.wait()
    assert not (tmp_path / "out" / "v1").exists()
    killed_at = int(latest_checkpoint(ckpts).name.split("-")[1])

    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    # The newest complete checkpoint at kill time, or a later one finished while we polled.
    assert result["resumed_from_step"] is not None and result["resumed_from_step"] >= killed_at >= 8
    assert result["metrics"]["steps"] == 60
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["v1"]
    verify_artifact(tmp_path / "out" / "v1", expected_sha256=result["sha256"],
                    engine_base_model=str(tiny_model), max_lora_rank=16)
