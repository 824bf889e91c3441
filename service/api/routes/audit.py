"""The audit log: who did what, when and why (ops only)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel
from sqlalchemy import select

from service.api.deps import OpsCaller, State
from service.db.models import AuditEvent

router = APIRouter(tags=["ops"])


class AuditOut(BaseModel):
    id: int
    actor: str
    action: str
    target_type: str
    target_id: str
    reason: str | None
    detail: dict[str, Any]
    created_at: datetime


@router.get("/v1/audit", response_model=list[AuditOut])
async def list_audit(caller: OpsCaller, state: State,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[AuditOut]:
    """The newest audit events of the caller's tenant."""
    async with state.sessions() as session:
        rows = await session.scalars(
            select(AuditEvent).where(AuditEvent.tenant_id == caller.tenant_id)
            .order_by(AuditEvent.id.desc()).limit(limit))
        return [AuditOut.model_validate(r, from_attributes=True) for r in rows]
