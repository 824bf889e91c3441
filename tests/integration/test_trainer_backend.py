"""The local trainer backend for real: `accelerate launch` of workers.training on the tiny model,
supervised by workers/trainer/job.py in a session of its own.

One process and two (DDP, gloo); FSDP over two processes; two "machines" on one host (two launches, machine ranks 0 and
1, a static rendezvous on loopback); a training process killed with SIGKILL is started again
from its checkpoint; a second worker (a fresh backend, not the parent) re-attaches to a job that
is still running; a training error fails at once; cancel and the orphan timeout stop every
process of the job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from service.config import Settings
from service.engine.artifact import verify_artifact
from service.local.embedded import free_port
from tests.helpers.datasets import addition_records
from workers.trainer import job as files
from workers.trainer.backend import TrainJob
from workers.trainer.drive import TrainingFailed, drive
from workers.trainer.local import LocalAccelerateBackend
from workers.training import latest_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _spec(root: Path, tiny_model: Path, records: list[dict] | None = None, **config) -> dict:
    from transformers import AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    records = records if records is not None else addition_records(AutoTokenizer.from_pretrained(tiny_model))
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"base_model_dir": str(tiny_model), "data": {"train": str(root / "train.jsonl")},
            "config": {"method": "sft", "learning_rate": 1e-3, "per_device_batch_size": 2,
                       "logging_steps": 1, **config},
            "out_dir": str(root / "adapter"), "work_dir": str(root / "work"), "lineage": {"test": 1}}


def _run(backend, root: Path, spec: dict, *, ref=None, report=None, max_restarts: int = 0):
    """drive() as the train stage calls it; returns (result, stored refs, events)."""
    stored: list[dict] = []
    events: list[dict] = []
    result = drive(backend, ref=ref, new_job=lambda n: TrainJob(root / f"job-{n}", spec, n),
                   store_ref=stored.append, report=report or events.append,
                   max_restarts=max_restarts, interval_s=0.2)
    return result, stored, events


def _tensor_shapes(artifact: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(artifact / "adapter_model.safetensors"), "np") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _training_pids(spec_path: Path) -> list[int]:
    """The workers.training processes (not the launcher) of one job."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"workers.training" in argv and str(spec_path).encode() in argv \
                and b"accelerate.commands.launch" not in argv:
            pids.append(int(proc.name))
    return pids


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory):
    """One single-process training through the backend, shared by the tests that compare."""
    root = tmp_path_factory.mktemp("one-process")
    spec = _spec(root, tiny_model, max_steps=6)
    result, stored, events = _run(LocalAccelerateBackend(Settings()), root, spec)
    return root, result, stored, events


def test_one_process_trains_reports_progress_and_records_the_job(one_process, tiny_model):
    root, result, stored, events = one_process
    assert result["metrics"]["world_size"] == 1 and result["metrics"]["steps"] == 6
    verify_artifact(root / "adapter", expected_sha256=result["sha256"],
                    engine_base_model=str(tiny_model), max_lora_rank=16)
    # Rank 0's progress, every step, with the loss and an ETA: what the run row shows.
    assert [e["step"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert all(e["total_steps"] == 6 and e["loss"] > 0 and "eta_s" in e for e in events)
    ref = stored[0]
    assert ref["backend"] == "local" and ref["attempt"] == 1 and ref["dir"] == str(root / "job-1")
    job = root / "job-1"
    _wait(lambda: (job / files.EXIT_FILE).exists(), 60, "the supervisor wrote no exit record")
    assert json.loads((job / files.EXIT_FILE).read_text())["returncode"] == 0
    launched = json.loads((job / files.LAUNCH_FILE).read_text())["launch"]
    assert launched["machines"] == 1 and launched["config_file"] is None


def test_two_processes_train_ddp_with_gloo(tiny_model, tmp_path):
    spec = _spec(tmp_path, tiny_model, max_steps=4, checkpoint_every_steps=2)
    result, _, events = _run(LocalAccelerateBackend(Settings(train_processes=2)), tmp_path, spec)
    assert result["metrics"]["world_size"] == 2 and result["metrics"]["backend"] == "gloo"
    assert [e["step"] for e in events] == [1, 2, 3, 4]  # reported once, by rank 0
    ckpt = tmp_path / "work" / "checkpoints" / "checkpoint-4"
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in ckpt.iterdir()}


def test_fsdp_shards_the_training_over_two_processes(one_process, tiny_model, tmp_path):
    """workers/accelerate/fsdp.yaml on CPU: FSDP over gloo trains the same adapter."""
    spec = _spec(tmp_path, tiny_model, max_steps=4, precision="fp32")
    settings = Settings(train_accelerate_config=REPO / "workers" / "accelerate" / "fsdp.yaml")
    result, _, events = _run(LocalAccelerateBackend(settings), tmp_path, spec)
    assert result["metrics"]["world_size"] == 2 and result["metrics"]["backend"] == "gloo"
    assert [e["step"] for e in events] == [1, 2, 3, 4]
    verify_artifact(tmp_path / "adapter", expected_sha256=result["sha256"],
                    engine_base_model=str(tiny_model), max_lora_rank=16)
    assert _tensor_shapes(tmp_path / "adapter") == _tensor_shapes(one_process[0] / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "np") as f:
        trained = [f.get_tensor(k) for k in f.keys() if "lora_B" in k]
    assert trained and all(abs(t).sum() > 0 for t in trained)  # gathered, not left as shards


def test_two_machines_on_one_host_train_one_adapter(one_process, tiny_model, tmp_path):
    """Machine 0 is the worker's job; machine 1 joins with the launch the job dir holds."""
    settings = Settings(train_machines=2, train_main_address="127.0.0.1", train_main_port=free_port())
    spec = _spec(tmp_path, tiny_model, max_steps=6)
    backend = LocalAccelerateBackend(settings)
    ref = backend.submit(TrainJob(tmp_path / "job-1", spec, 1))
    joiner = subprocess.Popen([sys.executable, "-m", "workers.trainer.job", "join",
                               str(tmp_path / "job-1"), "--machine-rank", "1"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        result, _, events = _run(backend, tmp_path, spec, ref=ref)
        out, _ = joiner.communicate(timeout=120)
        assert joiner.returncode == 0, out[-3000:]
    finally:
        if joiner.poll() is None:
            joiner.kill()
    assert result["metrics"]["world_size"] == 2 and result["metrics"]["backend"] == "gloo"
    launch = json.loads((tmp_path / "job-1" / files.LAUNCH_FILE).read_text())["launch"]
    assert launch["machines"] == 2 and launch["main_address"] == "127.0.0.1"
    # The same adapter as one process trains (names and shapes), and a loss curve.
    one_root = one_process[0]
    assert _tensor_shapes(tmp_path / "adapter") == _tensor_shapes(one_root / "adapter")
    assert [e["step"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(e["loss"], float) and e["loss"] > 0 for e in events)


def test_a_killed_training_process_is_started_again_from_its_checkpoint(tiny_model, tmp_path):
    spec = _spec(tmp_path, tiny_model, max_steps=60, checkpoint_every_steps=4)
    ckpts = tmp_path / "work" / "checkpoints"
    killed: list[int] = []

    def kill_once(event: dict) -> None:
        if not killed and event["step"] >= 10 and latest_checkpoint(ckpts) is not None:
            pids = _training_pids(tmp_path / "job-1" / files.SPEC_FILE)
            assert pids, "no training process found"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)  # like the OOM killer: no cleanup
            killed.extend(pids)

    result, stored, _ = _run(LocalAccelerateBackend(Settings()), tmp_path, spec,
                             report=kill_once, max_restarts=1)
    assert killed
    assert [r["attempt"] for r in stored] == [1, 2] and stored[1]["restarts"] == 1
    assert "exited with code" in stored[1]["previous_end"]  # the launcher saw its child die
    assert result["resumed_from_step"] is not None and result["resumed_from_step"] >= 4
    assert result["metrics"]["steps"] == 60
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("adapter")] == ["adapter"]
    verify_artifact(tmp_path / "adapter", expected_sha256=result["sha256"],
                    engine_base_model=str(tiny_model), max_lora_rank=16)


def test_a_new_worker_reattaches_to_the_running_job(tiny_model, tmp_path):
    spec = _spec(tmp_path, tiny_model, max_steps=80, checkpoint_every_steps=40)
    first = LocalAccelerateBackend(Settings())
    ref = first.submit(TrainJob(tmp_path / "job-1", spec, 1))
    _wait(lambda: first.poll(ref).events, 120, "no progress from the job")
    job = json.loads((tmp_path / "job-1" / files.JOB_FILE).read_text())

    # A restarted worker holds only the run row's reference: a fresh backend, not the parent.
    assert LocalAccelerateBackend(Settings()).poll(ref).state == "running"
    second = LocalAccelerateBackend(Settings())
    result, stored, events = _run(second, tmp_path, spec, ref=ref)
    assert stored == [] and not (tmp_path / "job-2").exists()  # nothing started again
    assert result["resumed_from_step"] is None and result["metrics"]["steps"] == 80
    assert events[0]["step"] == 1  # the history from the start, for the loss chart
    assert job["pid"] == ref["pid"]


def test_a_training_error_fails_at_once(tiny_model, tmp_path):
    spec = _spec(tmp_path, tiny_model, records=[{"prompt": "no completion here"}], max_steps=2)
    with pytest.raises(TrainingFailed, match="TrainingError") as info:
        _run(LocalAccelerateBackend(Settings()), tmp_path, spec, max_restarts=2)
    assert info.value.error["rank"] == 0 and "completion" in info.value.error["message"]
    assert not (tmp_path / "job-2").exists()


def test_cancel_and_the_orphan_timeout_stop_every_process(tiny_model, tmp_path):
    spec = _spec(tmp_path / "a", tiny_model, max_steps=5000)
    backend = LocalAccelerateBackend(Settings())
    ref = backend.submit(TrainJob(tmp_path / "a" / "job-1", spec, 1))
    _wait(lambda: backend.poll(ref).events, 120, "no progress from the job")
    pgid = json.loads((tmp_path / "a" / "job-1" / files.JOB_FILE).read_text())["launch_pgid"]
    backend.cancel(ref)
    _wait(lambda: backend.poll(ref).state != "running", 60, "cancel did not stop the job")
    status = backend.poll(ref)
    assert status.state == "lost" and status.detail.startswith("stopped (cancelled)")
    _wait(lambda: not _group_alive(pgid), 30, "training processes outlived the cancel")

    # Nobody polls this one: it stops itself.
    spec = _spec(tmp_path / "b", tiny_model, max_steps=5000)
    quiet = LocalAccelerateBackend(Settings(train_orphan_after_s=3))
    ref = quiet.submit(TrainJob(tmp_path / "b" / "job-1", spec, 1))
    exit_file = tmp_path / "b" / "job-1" / files.EXIT_FILE
    _wait(exit_file.exists, 120, "an orphaned job kept running")
    assert json.loads(exit_file.read_text())["stopped"].startswith("orphaned")
    pgid = json.loads((tmp_path / "b" / "job-1" / files.JOB_FILE).read_text())["launch_pgid"]
    _wait(lambda: not _group_alive(pgid), 30, "training processes outlived the orphan timeout")
