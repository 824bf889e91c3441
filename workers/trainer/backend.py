"""The trainer backend seam: the train stage hands a training to a backend and follows it.

A backend has four calls: submit (start a job, return a JSON-ready reference the run row keeps),
poll (its state and the progress rank 0 reported since the last poll), cancel, and result (the
training's result once it succeeded). The reference must be enough for another worker process,
after a crash, to poll and cancel the same job: nothing may live only in the submitting process.

The job's files (spec, progress, result, errors) live in a directory on storage the worker and
the trainer share (the run's directory under FLYWHEEL_ARTIFACT_DIR), which is also how another
backend (Ray, Kubeflow, a remote service: docs/scale-out.md) would hand over data and get the
artifact back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

JobState = Literal["running", "succeeded", "failed", "lost"]


@dataclass(frozen=True)
class TrainJob:
    """One training to run: workers.training's spec, and the directory the job owns."""

    job_dir: Path
    spec: dict[str, Any]  # base_model_dir, data paths, config, out_dir, work_dir, lineage, parent
    attempt: int = 1


@dataclass
class JobStatus:
    """What a poll saw.

    state: running; succeeded (the result is ready); failed (the training reported an error:
    starting it again would fail again); lost (it ended or vanished without an error: killed,
    out of memory, orphaned; starting it again resumes from its last checkpoint).
    """

    state: JobState
    events: list[dict[str, Any]] = field(default_factory=list)  # progress since the last poll
    error: dict[str, Any] | None = None  # failed: {"type", "message", "errno"?, "rank"}
    detail: str | None = None  # failed or lost: what ended it (exit code, signal, no heartbeat)


class TrainerBackend(Protocol):
    """Runs trainings; see the module docstring."""

    name: str

    def submit(self, job: TrainJob) -> dict[str, Any]:
        """Start the job; return its reference (JSON-ready, kept on the run row)."""
        ...

    def poll(self, ref: dict[str, Any]) -> JobStatus:
        """The job's state and the progress events reported since this backend's last poll."""
        ...

    def cancel(self, ref: dict[str, Any]) -> None:
        """Stop the job (no-op when it already ended)."""
        ...

    def result(self, ref: dict[str, Any]) -> dict[str, Any]:
        """The training's result (workers.training.result_to_dict) of a succeeded job."""
        ...

