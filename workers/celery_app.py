"""The Celery app. Redis only wakes workers; every message carries just a run id.

Settings follow Celery's guidance for long tasks: acks late + idempotent tasks (at-least-once),
requeue when a worker child dies, prefetch 1, a visibility timeout above the longest training
(else Redis redelivers a running training to a second worker, celery #5935), a dedicated queue.
"""

from __future__ import annotations

import logging
from pathlib import Path

from celery import Celery
from celery.signals import after_task_publish, beat_init

from service.config import get_settings
from service.local.embedded import resolve_broker_url
from service.wakeup import ADVANCE_RUN_TASK, EXPORT_TASK, TRAINING_QUEUE

# Beat's periodic tasks (sweep, watch) have a queue of their own, so a deployment can give them a
# worker of their own that no long training holds up.
CONTROL_QUEUE = "default"
SWEEP_TASK, WATCH_TASK, JUDGE_TASK = "flywheel.sweep", "flywheel.watch", "flywheel.judge"
ROUTES = {ADVANCE_RUN_TASK: TRAINING_QUEUE, EXPORT_TASK: TRAINING_QUEUE,
          SWEEP_TASK: CONTROL_QUEUE, WATCH_TASK: CONTROL_QUEUE, JUDGE_TASK: CONTROL_QUEUE}
# Every queue a worker deployment must consume (`celery worker -Q training,default`): work in a
# queue nobody consumes never runs (compose's worker once took only `training`: no sweeper, no
# watch window, no automatic rollback).
QUEUES = tuple(dict.fromkeys(ROUTES.values()))

log = logging.getLogger(__name__)
settings = get_settings()

app = Celery("flywheel", broker=resolve_broker_url(settings), include=["workers.tasks"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=CONTROL_QUEUE,
    task_routes={task: {"queue": queue} for task, queue in ROUTES.items()},
    broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout_s},
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    # A single worker (concurrency 1) runs these after a training ends: each expires after one
    # interval, so a long training leaves one sweep to run, not hundreds piled up behind it.
    beat_schedule={
        "sweep": {"task": SWEEP_TASK, "schedule": settings.sweep_interval_s,
                  "options": {"expires": settings.sweep_interval_s}},
        "watch": {"task": WATCH_TASK, "schedule": settings.watch_interval_s,
                  "options": {"expires": settings.watch_interval_s}},
        # Does nothing for aliases whose policy names no judge; bounded by judge_sweep_max_s.
        "judge": {"task": JUDGE_TASK, "schedule": settings.judge_interval_s,
                  "options": {"expires": settings.judge_interval_s}},
    },
    timezone="UTC",
)

# Beat touches this file after every task it sends, so its age tells a healthcheck whether beat
# is still sending (docker-compose.yml). Its schedule file cannot: dbm backends buffer writes.
BEAT_HEARTBEAT = "beat-heartbeat"
_beat_heartbeat: Path | None = None


@beat_init.connect
def _beat_started(**_) -> None:
    global _beat_heartbeat
    _beat_heartbeat = settings.data_dir / BEAT_HEARTBEAT
    _beat_heartbeat.parent.mkdir(parents=True, exist_ok=True)


@after_task_publish.connect
def _beat_sent(**_) -> None:
    if _beat_heartbeat is None:
        return  # not the beat process: the API and workers publish too
    try:
        _beat_heartbeat.touch()
    except OSError as exc:  # never stop beat over its heartbeat; the healthcheck will tell
        log.warning("could not touch %s: %s", _beat_heartbeat, exc)
