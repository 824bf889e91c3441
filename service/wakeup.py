"""Waking workers through Celery by task name. The service never imports workers.

A lost wake-up loses nothing: the run row is in Postgres and the sweeper re-enqueues it.
"""

from __future__ import annotations

import logging
import uuid
from functools import lru_cache

from celery import Celery

log = logging.getLogger(__name__)

TRAINING_QUEUE = "training"
ADVANCE_RUN_TASK = "flywheel.advance_run"
# Exports share the training queue: both are heavy model work a worker does one at a time.
EXPORT_TASK = "flywheel.export_version"


@lru_cache(maxsize=4)
def producer(broker_url: str) -> Celery:
    """A Celery app used only to send messages (no result backend)."""
    app = Celery("flywheel-producer", broker=broker_url)
    # Fail fast when Redis is down: the caller carries on and the sweeper catches up.
    app.conf.broker_connection_retry = False
    app.conf.broker_connection_timeout = 2
    app.conf.broker_transport_options = {"max_retries": 0, "socket_connect_timeout": 2,
                                         "socket_timeout": 2}
    return app


def _send(broker_url: str, task: str, what: str, ident: uuid.UUID) -> bool:
    try:
        producer(broker_url).send_task(task, args=[str(ident)], queue=TRAINING_QUEUE, retry=False)
        return True
    except Exception as exc:  # noqa: BLE001 - any broker failure: the sweeper re-enqueues
        log.warning("could not enqueue %s %s (%s); the sweeper will", what, ident,
                    type(exc).__name__)
        return False


def wake_run(broker_url: str, run_id: uuid.UUID) -> bool:
    """Enqueue a wake-up for the run; False (logged) when the broker is unreachable."""
    return _send(broker_url, ADVANCE_RUN_TASK, "run", run_id)


def wake_export(broker_url: str, export_id: uuid.UUID) -> bool:
    """Enqueue an export job; False (logged) when the broker is unreachable."""
    return _send(broker_url, EXPORT_TASK, "export", export_id)
