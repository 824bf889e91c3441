"""Storing an interaction while it is generated, so the answer waits for whichever is last.

The request half is inserted (as `pending`) when generation starts; the answer half is an
update once it is known. When Postgres cannot take the insert, the whole interaction goes to
the local spool after generation (service.intake.outbox); when it cannot take the update, the
update does. Only when neither can take it does the client get an error instead of its answer.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from service.db import hotpath
from service.intake.outbox import KnownOutage, is_outage
from service.intake.spool import SpoolFull, SpoolUnavailable
from service.metrics import INTERACTIONS, SPOOL_FULL, STORAGE_FAILURES

log = logging.getLogger(__name__)


class NotStored(Exception):
    """Neither Postgres nor the spool took the interaction: the client must not get an id."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class InteractionWrite:
    """One interaction being stored alongside its generation."""

    def __init__(self, state, values: dict[str, Any]) -> None:
        self.state = state
        self.values = values
        self.started_at = datetime.now(UTC)
        self._insert = asyncio.ensure_future(self._insert_pending())

    @property
    def id(self) -> uuid.UUID:
        return self.values["id"]

    async def _insert_pending(self) -> BaseException | None:
        if self.state.outbox.db_down:
            return KnownOutage()
        try:
            await hotpath.insert_interaction(self.state.fast_pool, self.values)
        except Exception as exc:  # noqa: BLE001 - handled in finish(), where the answer is
            if is_outage(exc):
                self.state.outbox.note_outage()
            return exc
        return None

    async def finish(self, answer: dict[str, Any], *, wait: bool) -> None:
        """Store the answer. With wait=False, an interaction already in Postgres gets its answer
        after this returns (read-your-writes holds in this process: see `completing`).
        Raises NotStored when neither Postgres nor the spool took the interaction."""
        failed = await self._insert
        state = self.state
        alias = self.values.get("alias", "")
        if failed is None:
            INTERACTIONS.labels(alias).inc()
            if wait:
                await _complete(state, self.id, answer)
            else:
                task = state.spawn(_complete(state, self.id, answer))
                state.completing[self.id] = task
                task.add_done_callback(lambda _: state.completing.pop(self.id, None))
            return
        STORAGE_FAILURES.labels("interaction").inc()
        if not isinstance(failed, KnownOutage):
            # No message contents in logs: they may hold PII.
            log.warning("Postgres could not take interaction %s (%s)", self.id,
                        type(failed).__name__)
        if not is_outage(failed):
            raise NotStored(500, "interaction_not_stored",
                            f"the answer could not be stored ({type(failed).__name__}); it was "
                            "not returned, so it cannot be rated")
        try:
            await state.outbox.add_interaction({**self.values, **answer,
                                                "created_at": self.started_at})
        except (SpoolFull, SpoolUnavailable) as exc:
            SPOOL_FULL.labels("interaction").inc()
            log.error("interaction %s not stored: database unavailable and %s", self.id, exc)
            raise NotStored(503, "storage_unavailable",
                            f"database unavailable and the local spool cannot take more: {exc}"
                            ) from exc
        INTERACTIONS.labels(alias).inc()

    def abandon(self) -> None:
        """The engine gave no answer: remove the pending row if it was stored."""
        self.state.spawn(self._abandon())

    async def _abandon(self) -> None:
        if await self._insert is None:
            try:
                await hotpath.delete_unanswered(self.state.fast_pool, self.id)
            except Exception as exc:  # noqa: BLE001 - a pending row is never trained on
                log.warning("could not remove unanswered interaction %s: %s", self.id,
                            type(exc).__name__)


async def _complete(state, iid: uuid.UUID, answer: dict[str, Any]) -> None:
    """The answer's update; to the spool when Postgres cannot take it."""
    try:
        await hotpath.complete_interaction(state.fast_pool, iid, answer)
        return
    except Exception as exc:  # noqa: BLE001 - the client has its answer: keep it somewhere
        STORAGE_FAILURES.labels("response").inc()
        log.warning("Postgres could not take the answer of interaction %s (%s)", iid,
                    type(exc).__name__)
        if not is_outage(exc):
            return
        state.outbox.note_outage()
    try:
        await state.outbox.add_response(iid, answer)
    except (SpoolFull, SpoolUnavailable) as exc:
        SPOOL_FULL.labels("response").inc()
        log.error("the answer of interaction %s is not stored (it stays pending): %s", iid, exc)
