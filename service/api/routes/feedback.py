"""Feedback on interactions, and reading an interaction back."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import UTC, datetime

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import Caller, State, owner_filter
from service.api.errors import ApiError, unavailable
from service.api.schemas import FeedbackOut, FeedbackRequest, InteractionOut
from service.db import hotpath
from service.db import repositories as repo
from service.intake import ratelimit
from service.intake.spool import SpoolFull, SpoolUnavailable
from service.metrics import FEEDBACK, SPOOL_FULL

router = APIRouter(tags=["feedback"])


@router.post("/v1/feedback", response_model=FeedbackOut, status_code=201,
             responses={200: {"model": FeedbackOut, "description": "an earlier rating replaced"},
                        202: {"model": FeedbackOut, "description": "kept in the spool with its "
                              "interaction during a database outage; written back after it"}})
async def post_feedback(body: FeedbackRequest, caller: Caller, state: State):
    """Rate an interaction; posting again for the same (interaction, rater) replaces the rating."""
    # Without a rater_id, each key rates as one anonymous rater.
    rater = body.rater_id or f"key:{caller.key_id}"
    settings = state.settings
    verdict = await ratelimit.check_feedback(
        state.rate_counter, caller.tenant_id, rater, per_tenant=settings.feedback_rate_per_tenant,
        per_rater=settings.feedback_rate_per_rater, key_id=str(caller.key_id),
        per_key=settings.feedback_rate_per_key)
    if not verdict.allowed:
        who = {"rater": f"rater {rater!r}", "key": "this API key"}.get(
            verdict.scope or "tenant", f"tenant {caller.tenant_id!r}")
        raise ApiError(429, f"feedback rate limit for {who}: {verdict.limit} per minute",
                       param="rater_id" if verdict.scope == "rater" else None,
                       code=f"{verdict.scope}_rate_limited",
                       headers={"Retry-After": str(verdict.retry_after_s)})
    write = hotpath.FeedbackWrite(
        interaction_id=body.interaction_id, tenant_id=caller.tenant_id,
        owner_key=owner_filter(caller), rater_id=rater, rating=body.rating,
        correction=body.correction, comment=body.comment, api_key_id=caller.key_id)
    if _visible_in_spool(state, write):
        return await _spool_feedback(state, write)
    if state.outbox.db_down:  # answered now, not after waiting for a connection
        raise unavailable("database unavailable; retry shortly", state.settings.retry_after_s,
                          "database_unavailable")
    row = await state.feedback_writer.submit(write)
    if row is None:
        raise ApiError(404, f"interaction {body.interaction_id} not found", param="interaction_id",
                       code="interaction_not_found")
    FEEDBACK.labels(row.alias or "", body.rating).inc()
    if row.adapter_id is not None:
        state.feedback_arrived(row.adapter_id, row.alias, caller.tenant_id)
    out = FeedbackOut(id=row.id, interaction_id=body.interaction_id, rating=body.rating,
                      rater_id=rater, correction=body.correction, comment=body.comment,
                      replaced=row.replaced, created_at=row.created_at, updated_at=row.updated_at)
    return JSONResponse(out.model_dump(mode="json"), status_code=200 if row.replaced else 201)


def _visible_in_spool(state, write: hotpath.FeedbackWrite) -> bool:
    held = state.outbox.held(write.interaction_id)
    return held is not None and held.tenant_id == write.tenant_id and (
        write.owner_key is None or held.api_key_id == write.owner_key)


async def _spool_feedback(state, write: hotpath.FeedbackWrite) -> JSONResponse:
    """A rating of an interaction still in the spool: kept after it, written back after it."""
    write = replace(write, id=uuid.uuid4())
    try:
        await state.outbox.add_feedback(write)
    except (SpoolFull, SpoolUnavailable) as exc:
        SPOOL_FULL.labels("feedback").inc()
        raise unavailable(f"database unavailable and the local spool cannot take more: {exc}",
                          state.settings.retry_after_s, "storage_unavailable") from exc
    now = datetime.now(UTC)
    out = FeedbackOut(id=write.id, interaction_id=write.interaction_id, rating=write.rating,
                      rater_id=write.rater_id, correction=write.correction,
                      comment=write.comment, pending=True, created_at=now, updated_at=now)
    return JSONResponse(out.model_dump(mode="json"), status_code=202)


@router.get("/v1/interactions/{interaction_id}", response_model=InteractionOut)
async def get_interaction(interaction_id: uuid.UUID, caller: Caller, state: State) -> InteractionOut:
    """An interaction with its feedback; other tenants' (and, for product keys, other keys') → 404."""
    completing = state.completing.get(interaction_id)
    if completing is not None:  # its answer is being stored by this process: read your writes
        await asyncio.shield(completing)
    async with state.sessions() as session:
        found = await repo.get_interaction(session, interaction_id, caller.tenant_id,
                                           owner_filter(caller))
    if found is None:
        raise ApiError(404, f"interaction {interaction_id} not found", param="interaction_id",
                       code="interaction_not_found")
    interaction, feedback = found
    return InteractionOut(
        **{c: getattr(interaction, c) for c in InteractionOut.model_fields if c != "feedback"},
        feedback=[FeedbackOut(id=f.id, interaction_id=f.interaction_id, rating=f.rating,
                              rater_id=f.rater_id, correction=f.correction, comment=f.comment,
                              source=f.source, created_at=f.created_at, updated_at=f.updated_at) for f in feedback],
    )
