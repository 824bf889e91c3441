"""The Celery app. Redis only wakes workers; every message carries just a run id.

Settings follow Celery's guidance for long tasks: acks late + idempotent tasks (at-least-once),
requeue when a worker child dies, prefetch 1, a visibility timeout above the longest training
(else Redis redelivers a running training to a second worker, celery #5935), a dedicated queue.
"""

from __future__ import annotations

from celery import Celery

from service.config import get_settings
from service.embedded import resolve_broker_url
from service.wakeup import ADVANCE_RUN_TASK, EXPORT_TASK, TRAINING_QUEUE

settings = get_settings()

app = Celery("flywheel", broker=resolve_broker_url(settings), include=["workers.tasks"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue="default",
    task_routes={ADVANCE_RUN_TASK: {"queue": TRAINING_QUEUE},
                 EXPORT_TASK: {"queue": TRAINING_QUEUE}},
    broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout_s},
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    beat_schedule={
        "sweep": {"task": "flywheel.sweep", "schedule": settings.sweep_interval_s},
        "watch": {"task": "flywheel.watch", "schedule": settings.watch_interval_s},
    },
    timezone="UTC",
)
