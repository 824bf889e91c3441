"""Waking workers through Celery by task name. The service never imports workers.

A lost wake-up loses nothing: the run row is in Postgres and the sweeper re-enqueues it.
Each wake-up leaves a marker in Redis until a worker takes the message, so the sweeper does not
pile a new message onto a queued one every round while the worker is busy with a long training.
"""

from __future__ import annotations

import logging
import uuid
from functools import lru_cache

from celery import Celery
from redis import Redis

from service.config import get_settings

log = logging.getLogger(__name__)

TRAINING_QUEUE = "training"
ADVANCE_RUN_TASK = "flywheel.advance_run"
# Exports share the training queue: both are heavy model work a worker does one at a time.
EXPORT_TASK = "flywheel.export_version"
RUN, EXPORT = "run", "export"
_TASKS = {RUN: ADVANCE_RUN_TASK, EXPORT: EXPORT_TASK}


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


@lru_cache(maxsize=4)
def _markers(broker_url: str) -> Redis:
    return Redis.from_url(broker_url, socket_connect_timeout=2, socket_timeout=2)


def _marker(what: str, ident: uuid.UUID | str) -> str:
    return f"fw:wake:{what}:{ident}"


def _send(broker_url: str, what: str, ident: uuid.UUID, resend_after_s: float | None) -> bool:
    marker = _marker(what, ident)
    # The marker outlives a message only when a worker died holding it unstarted: the bound.
    ttl = max(1, int(resend_after_s or _default_ttl()))
    try:
        if not _markers(broker_url).set(marker, "1", ex=ttl, nx=resend_after_s is not None):
            return False  # a wake-up is still waiting in the queue
        try:
            producer(broker_url).send_task(_TASKS[what], args=[str(ident)], queue=TRAINING_QUEUE,
                                           retry=False)
        except BaseException:
            _markers(broker_url).delete(marker)
            raise
        return True
    except Exception as exc:  # noqa: BLE001 - any broker failure: the sweeper re-enqueues
        log.warning("could not enqueue %s %s (%s); the sweeper will", what, ident,
                    type(exc).__name__)
        return False


def _default_ttl() -> float:

    return get_settings().wake_resend_after_s


def wake_run(broker_url: str, run_id: uuid.UUID, *, resend_after_s: float | None = None) -> bool:
    """Enqueue a wake-up for the run; False when the broker is unreachable (logged) or, with
    `resend_after_s` (the sweeper), when one sent within that time is still waiting."""
    return _send(broker_url, RUN, run_id, resend_after_s)


def wake_export(broker_url: str, export_id: uuid.UUID, *,
                resend_after_s: float | None = None) -> bool:
    """Enqueue an export job; False as for wake_run."""
    return _send(broker_url, EXPORT, export_id, resend_after_s)


def taken(broker_url: str, what: str, ident: uuid.UUID | str) -> None:
    """A worker took the wake-up: from now on the sweeper may send another (say, after the
    worker dies mid-job and its lease runs out)."""
    try:
        _markers(broker_url).delete(_marker(what, ident))
    except Exception as exc:  # noqa: BLE001 - at worst the sweeper waits out the marker
        log.warning("could not clear the wake-up marker of %s %s (%s)", what, ident,
                    type(exc).__name__)
