"""Follow a training job to its end for the train stage: submit (or re-attach to) it, pass its
progress on, start it again from its checkpoint when it was lost, and return its result.

Plain functions over the backend seam: the stage gives the callbacks that touch the run row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from service.config import Settings
from workers.trainer.backend import JobStatus, TrainerBackend, TrainJob
from workers.trainer.local import LocalAccelerateBackend

log = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """The training reported an error (or was lost too often): the run cannot succeed this way.

    ``error`` is what the training process reported ({"type", "message", "errno"?}), if any.
    """

    def __init__(self, reason: str, error: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.error = error


def backend_for(settings: Settings) -> TrainerBackend:
    """The backend FLYWHEEL_TRAIN_BACKEND names (only "local" is built in)."""
    if settings.train_backend == "local":
        return LocalAccelerateBackend(settings)
    raise ValueError(f"unknown trainer backend {settings.train_backend!r}")


def drive(backend: TrainerBackend, *, ref: dict[str, Any] | None,
          new_job: Callable[[int], TrainJob], store_ref: Callable[[dict[str, Any]], None],
          report: Callable[[dict[str, Any]], None], max_restarts: int, interval_s: float,
          sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Run one training to its result.

    ``ref``: the job the run already has (a worker died following it), re-attached to when its
    backend still knows it. ``new_job(attempt)`` builds attempt N's job; ``store_ref`` keeps a
    submitted job's reference on the run before anything else happens; ``report`` gets each
    progress event (and may raise to stop: the job is then cancelled). A job lost without an
    error (killed, out of memory, orphaned) is submitted again, resuming from its checkpoint, at
    most ``max_restarts`` times.
    """
    if ref is not None and ref.get("backend") != backend.name:
        log.warning("training job %s belongs to backend %r, not %r: starting a new one",
                    ref.get("dir"), ref.get("backend"), backend.name)
        ref = _submit(backend, new_job(int(ref.get("attempt", 0)) + 1), store_ref)
    elif ref is not None:
        log.info("re-attaching to training job %s (attempt %s)", ref.get("dir"), ref.get("attempt"))
    else:
        ref = _submit(backend, new_job(1), store_ref)
    restarts = int(ref.get("restarts", 0))
    while True:
        status = backend.poll(ref)
        try:
            for event in status.events:
                report(event)
        except BaseException:
            backend.cancel(ref)
            raise
        if status.state == "running":
            sleep(interval_s)
            continue
        if status.state == "succeeded":
            return backend.result(ref)
        if status.state == "failed":
            err = status.error or {}
            raise TrainingFailed(f"training failed: {err.get('type', 'error')}: "
                                 f"{err.get('message', status.detail)}", status.error)
        # lost: start again from the last checkpoint
        if restarts >= max_restarts:
            raise TrainingFailed(f"training process lost {restarts + 1} times, last: {status.detail}")
        restarts += 1
        log.warning("training job %s lost (%s): starting attempt %d from its last checkpoint",
                    ref.get("dir"), status.detail, int(ref["attempt"]) + 1)
        ref = _submit(backend, new_job(int(ref["attempt"]) + 1), store_ref, restarts=restarts,
                      previous=status)


def _submit(backend: TrainerBackend, job: TrainJob, store_ref: Callable[[dict[str, Any]], None], *,
            restarts: int = 0, previous: JobStatus | None = None) -> dict[str, Any]:
    ref = {**backend.submit(job), "restarts": restarts}
    if previous is not None:
        ref["previous_end"] = (previous.detail or "")[:500]
    store_ref(ref)
    return ref
