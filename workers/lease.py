"""Keeps a lease (a run's, or an export job's) alive from a background thread while long work
runs, and carries the latest progress into the row."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from service.db.session import session_scope
from service.domain import runs

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """Another worker took the job over (our lease expired): stop working on it."""


# (session, progress or None) -> whether this worker still holds the lease.
Renew = Callable[[Session, dict | None], bool]


class LeaseKeeper:
    """Renews the lease every lease_s/3 and carries the latest progress into the row.

    ``renew`` defaults to a training run's (service.domain.runs.renew); export jobs pass their own.
    """

    def __init__(self, sessions: sessionmaker, run_id: uuid.UUID, owner: str, lease_s: float,
                 renew: Renew | None = None) -> None:
        self.sessions, self.run_id, self.owner, self.lease_s = sessions, run_id, owner, lease_s
        self._renew = renew or (lambda s, p: runs.renew(s, run_id, owner, lease_s, p))
        self.lost = False
        self._progress: dict | None = None
        self._history: list[list[float]] = []  # [step, loss] for the ops page's loss chart
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{run_id}", daemon=True)
        self._last_write = 0.0
        self._lock = threading.Lock()  # report() and the renewal thread both write

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._flush()

    def report(self, progress: dict) -> None:
        """Record progress; written at most once a second. Raises LeaseLost if the run was taken."""
        if self.lost:
            raise LeaseLost(f"{self.run_id}: lease lost to another worker")
        if isinstance(progress.get("loss"), (int, float)):
            self._history.append([progress.get("step", 0), round(float(progress["loss"]), 5)])
            if len(self._history) > 400:  # keep the chart light: drop every other point
                self._history = self._history[::2]
        self._progress = {**progress, "loss_history": list(self._history)}
        if time.monotonic() - self._last_write >= 1.0:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        progress, self._progress = self._progress, None
        try:
            with session_scope(self.sessions) as s:
                if not self._renew(s, progress):
                    self.lost = True
            self._last_write = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - a DB blip must not kill training; retry next tick
            log.warning("lease renewal for %s failed: %s", self.run_id, type(exc).__name__)
            if progress is not None and self._progress is None:
                self._progress = progress

    def _loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            self._flush()
