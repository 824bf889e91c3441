"""The trainer seam's plain parts: the accelerate command line, and drive() over a fake backend
(restart from checkpoint when lost, fail on a reported error, cancel when reporting raises,
re-attach to a job the run already has). The real backend: tests/integration/test_trainer_backend.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.config import Settings
from workers.trainer.backend import JobStatus, TrainJob
from workers.trainer.drive import TrainingFailed, drive
from workers.trainer.job import process_start
from workers.trainer.launch import DDP_CONFIG, Launch, accelerate_argv, plan_launch


class FakeBackend:
    name = "fake"

    def __init__(self, script: dict[int, list[JobStatus]]) -> None:
        self.script = script  # attempt -> what successive polls see
        self.submitted: list[TrainJob] = []
        self.cancelled: list[dict] = []

    def submit(self, job: TrainJob) -> dict:
        self.submitted.append(job)
        return {"backend": self.name, "dir": str(job.job_dir), "attempt": job.attempt}

    def poll(self, ref: dict) -> JobStatus:
        return self.script[ref["attempt"]].pop(0)

    def cancel(self, ref: dict) -> None:
        self.cancelled.append(ref)

    def result(self, ref: dict) -> dict:
        return {"attempt": ref["attempt"]}


def _job(attempt: int) -> TrainJob:
    return TrainJob(job_dir=Path(f"/jobs/job-{attempt}"), spec={}, attempt=attempt)


def _drive(backend, ref=None, max_restarts=2, **kw):
    stored, events = [], []
    out = drive(backend, ref=ref, new_job=_job, store_ref=stored.append,
                report=kw.pop("report", events.append), max_restarts=max_restarts, interval_s=0,
                sleep=lambda s: None)
    return out, stored, events


def test_progress_is_passed_on_and_the_result_returned():
    backend = FakeBackend({1: [JobStatus("running", [{"step": 1}]), JobStatus("running", []),
                               JobStatus("succeeded", [{"step": 2}])]})
    out, stored, events = _drive(backend)
    assert out == {"attempt": 1}
    assert [e["step"] for e in events] == [1, 2]
    assert [r["attempt"] for r in stored] == [1] and stored[0]["restarts"] == 0


def test_a_lost_job_is_started_again_until_the_restarts_run_out():
    backend = FakeBackend({1: [JobStatus("lost", detail="killed by SIGKILL")],
                           2: [JobStatus("running"), JobStatus("succeeded")]})
    out, stored, _ = _drive(backend, max_restarts=1)
    assert out == {"attempt": 2}
    assert [j.job_dir.name for j in backend.submitted] == ["job-1", "job-2"]
    assert stored[-1]["restarts"] == 1 and stored[-1]["previous_end"] == "killed by SIGKILL"

    backend = FakeBackend({1: [JobStatus("lost", detail="a")], 2: [JobStatus("lost", detail="b")]})
    with pytest.raises(TrainingFailed, match="lost 2 times, last: b"):
        _drive(backend, max_restarts=1)


def test_a_reported_error_fails_at_once_without_a_restart():
    err = {"type": "TrainingError", "message": "record 3 has no completion"}
    backend = FakeBackend({1: [JobStatus("failed", error=err, detail="exited with code 1")]})
    with pytest.raises(TrainingFailed, match="TrainingError: record 3 has no completion") as info:
        _drive(backend)
    assert info.value.error == err and len(backend.submitted) == 1


def test_reporting_that_raises_cancels_the_job():
    backend = FakeBackend({1: [JobStatus("running", [{"step": 1}])]})

    def lost(event):
        raise RuntimeError("lease lost")

    with pytest.raises(RuntimeError, match="lease lost"):
        _drive(backend, report=lost)
    assert [r["attempt"] for r in backend.cancelled] == [1]


def test_a_job_the_run_has_is_followed_not_submitted_again():
    backend = FakeBackend({3: [JobStatus("running"), JobStatus("succeeded")]})
    ref = {"backend": "fake", "dir": "/jobs/job-3", "attempt": 3, "restarts": 2}
    out, stored, _ = _drive(backend, ref=ref, max_restarts=2)
    assert out == {"attempt": 3} and backend.submitted == [] and stored == []

    # Another backend's job cannot be followed: a new attempt starts (from the checkpoint).
    backend = FakeBackend({4: [JobStatus("succeeded")]})
    out, stored, _ = _drive(backend, ref={**ref, "backend": "ray"})
    assert out == {"attempt": 4} and [r["attempt"] for r in stored] == [4]


def test_one_process_launch_is_plain_and_several_use_the_ddp_config(tmp_path):
    spec = tmp_path / "spec.json"
    one = plan_launch(Settings(), spec, free_port=29999)
    argv = accelerate_argv(one)
    assert argv[1:3] == ["-m", "accelerate.commands.launch"]
    assert argv[argv.index("--num_processes") + 1] == "1" and "--config_file" not in argv
    assert "--main_process_port" not in argv
    assert argv[-4:] == ["-m", "workers.training", "--spec", str(spec)]

    two = plan_launch(Settings(train_processes=2), spec, free_port=29999)
    argv = accelerate_argv(two)
    assert argv[argv.index("--config_file") + 1] == str(DDP_CONFIG)
    assert argv[argv.index("--num_processes") + 1] == "2"
    assert argv[argv.index("--main_process_port") + 1] == "29999"


def test_machines_need_an_address_and_port_and_count_processes_over_all():
    with pytest.raises(ValueError, match="FLYWHEEL_TRAIN_MAIN_ADDRESS"):
        plan_launch(Settings(train_machines=2, train_main_port=29500), Path("s"), free_port=1)
    with pytest.raises(ValueError, match="FLYWHEEL_TRAIN_MAIN_PORT"):
        plan_launch(Settings(train_machines=2, train_main_address="10.0.0.1"), Path("s"), free_port=1)
    launch = plan_launch(Settings(train_machines=2, train_processes=2, train_main_address="10.0.0.1",
                                  train_main_port=29500), Path("s"), free_port=1)
    rank1 = accelerate_argv(launch, machine_rank=1)
    for flag, value in (("--num_processes", "4"), ("--num_machines", "2"), ("--machine_rank", "1"),
                        ("--main_process_ip", "10.0.0.1"), ("--main_process_port", "29500"),
                        ("--rdzv_backend", "static")):
        assert rank1[rank1.index(flag) + 1] == value
    with pytest.raises(ValueError, match="machine rank 2"):
        accelerate_argv(launch, machine_rank=2)
    assert Launch.from_dict(launch.as_dict()) == launch


def test_process_start_identifies_a_live_process_and_not_a_missing_one():
    assert process_start(os.getpid()) == process_start(os.getpid()) is not None
    assert process_start(2**22 + 12345) is None
