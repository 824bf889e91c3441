"""The API's view of export rows: shared by the exports routes and the alias detail."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select

from service.db.models import AdapterVersion, Export


class ExportFile(BaseModel):
    name: str
    bytes: int
    sha256: str


class ExportOut(BaseModel):
    id: uuid.UUID
    version: int
    lora_name: str
    format: str
    requested_quant: str | None
    quant: str | None
    fallback: bool
    status: str
    requested_by: str
    sha256: str | None
    bytes: int | None
    files: list[ExportFile]
    progress: dict[str, Any]
    failure_reason: str | None
    suggestion: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    # Per attempt: the consistency numbers and reasons (detail only, not in listings).
    metrics: dict[str, Any] | None = None
    lineage: dict[str, Any] | None = None


def export_out(e: Export, version: AdapterVersion, *, detail: bool = False) -> ExportOut:
    """The API view of an export row."""
    return ExportOut(
        id=e.id, version=version.number, lora_name=version.lora_name, format=e.format,
        requested_quant=e.requested_quant, quant=e.quant, fallback=e.fallback, status=e.status,
        requested_by=e.requested_by, sha256=e.sha256, bytes=e.bytes,
        files=[ExportFile(**f) for f in e.files or []], progress=e.progress or {},
        failure_reason=e.failure_reason, suggestion=e.suggestion, attempts=e.attempts,
        created_at=e.created_at, started_at=e.started_at, finished_at=e.finished_at,
        metrics=e.metrics if detail else None, lineage=e.lineage if detail else None)


async def list_for_adapter(session, adapter_id: uuid.UUID, limit: int = 50) -> list[ExportOut]:
    """An alias's exports, newest first."""
    rows = await session.execute(
        select(Export, AdapterVersion).join(AdapterVersion, AdapterVersion.id == Export.version_id)
        .where(Export.adapter_id == adapter_id).order_by(Export.created_at.desc()).limit(limit))
    return [export_out(e, v) for e, v in rows]
