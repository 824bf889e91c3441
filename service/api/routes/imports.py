"""Importing ratings collected elsewhere into an alias's feedback buffer (ops).

The file is the request body. It is read and checked record by record before anything is
written; the writing then runs as a background job in this API process (imports are database
work: they must not queue behind a training on the worker's single slot, and the file never has
to reach another machine). Poll the returned job for its counts.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import tempfile
import uuid
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from service.api.deps import OpsCaller, State
from service.api.errors import ApiError
from service.api.lookups import adapter_or_404
from service.api.schemas import AliasPath, NoNul
from service.db.models import Adapter, FeedbackImport
from service.db.session import session_scope
from service.domain.adapter_import import AdapterRefused, register, unpack_tar
from service.imports import FileRefused, RatingRule, parse_file, store
from service.wakeup import wake_run

log = logging.getLogger(__name__)

router = APIRouter(tags=["imports"])

# The body-size limits of these routes (FLYWHEEL_IMPORT_MAX_BYTES,
# FLYWHEEL_ADAPTER_UPLOAD_MAX_BYTES) are set by path in the app.
IMPORT_PATH = r"^/v1/adapters/[^/]+/imports$"
ADAPTER_UPLOAD_PATH = r"^/v1/adapters/[^/]+/versions$"


class ImportSource(str, enum.Enum):
    openwebui = "openwebui"
    langfuse = "langfuse"
    jsonl = "jsonl"


class ReportedRecord(BaseModel):
    where: str
    reason: str


class ImportOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    alias: str
    source: str
    status: str  # running | done | failed
    requested_by: str
    file_name: str | None
    file_sha256: str | None
    file_bytes: int | None
    options: dict[str, Any]
    total: int
    imported: int
    skipped: int
    skipped_reasons: dict[str, int]
    errors: int
    error_samples: list[ReportedRecord]
    run_id: uuid.UUID | None
    failure_reason: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class DryRunOut(BaseModel):
    dry_run: bool
    source: str
    file_sha256: str
    file_bytes: int
    total: int
    imported: int  # would be imported
    skipped: int
    skipped_reasons: dict[str, int]
    errors: int
    error_samples: list[ReportedRecord]


def _out(job: FeedbackImport, alias: str) -> ImportOut:
    return ImportOut.model_validate({**{c: getattr(job, c) for c in ImportOut.model_fields
                                        if c != "alias"}, "alias": alias})


@router.post("/v1/adapters/{alias}/imports", response_model=ImportOut, status_code=202,
             responses={200: {"model": DryRunOut, "description": "dry_run: what the import would "
                                                                 "do; nothing is written"}})
async def start_import(
    alias: AliasPath, request: Request, caller: OpsCaller, state: State,
    source: Annotated[ImportSource, Query(description="openwebui, langfuse or jsonl")],
    dry_run: bool = False,
    file_name: Annotated[str, Query(max_length=500), NoNul] | None = None,
    score_name: Annotated[str, Query(min_length=1, max_length=200), NoNul] | None = None,
    up_min: float | None = None,
    down_max: float | None = None,
) -> Any:
    """Import a feedback export (the request body) into the alias's feedback buffer (ops).

    Malformed records are reported with their line or index and skipped; records imported
    before are skipped; the rest count toward the trigger like live feedback.
    """
    defaults = RatingRule()
    try:
        rule = RatingRule(up_min=defaults.up_min if up_min is None else up_min,
                          down_max=defaults.down_max if down_max is None else down_max,
                          score_name=score_name or defaults.score_name)
    except ValueError as exc:
        raise ApiError(422, str(exc), param="up_min", code="invalid_rating_rule") from exc
    body = await request.body()
    if not body:
        raise ApiError(422, "the request body must be the export file", param="body",
                       code="empty_import_file")
    async with state.sessions() as session:
        adapter = await adapter_or_404(session, caller.tenant_id, alias)
        adapter_id = adapter.id
    try:
        parsed = await asyncio.to_thread(parse_file, source.value, body, rule)
    except FileRefused as exc:
        raise ApiError(422, str(exc), param="body", code="invalid_import_file") from exc
    sessions = state.sync_sessions()
    if dry_run:
        def report():
            with session_scope(sessions) as s:
                return store.dry_run(s, caller.tenant_id, parsed)

        return JSONResponse(DryRunOut(**await asyncio.to_thread(report)).model_dump(mode="json"))

    def create():
        with session_scope(sessions) as s:
            job = store.create_job(s, s.get(Adapter, adapter_id), parsed,
                                   actor=f"key:{caller.key_id}", rule=rule, file_name=file_name)
            s.flush()
            s.refresh(job)  # created_at and the other server defaults, before it leaves
            s.expunge(job)
            return job

    job = await asyncio.to_thread(create)
    policy = state.policies.for_alias(alias, caller.tenant_id)
    state.spawn(_run(state, job.id, parsed, policy, caller.key_id))
    return _out(job, alias)


async def _run(state, job_id: uuid.UUID, parsed, policy, key_id: uuid.UUID) -> None:
    try:
        job = await asyncio.to_thread(store.run_job, state.sync_sessions(), job_id, parsed, policy,
                                      api_key_id=key_id)
    except Exception:  # noqa: BLE001 - a job row that stops moving is marked failed when read
        log.exception("import %s could not finish", job_id)
        return
    if job.run_id is not None:
        await asyncio.to_thread(wake_run, state.broker_url, job.run_id)


@router.get("/v1/adapters/{alias}/imports", response_model=list[ImportOut])
async def list_imports(alias: AliasPath, caller: OpsCaller, state: State,
                       limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[ImportOut]:
    """The alias's imports, newest first, with their counts (ops)."""
    async with state.sessions() as session:
        adapter = await adapter_or_404(session, caller.tenant_id, alias)
    sessions = state.sync_sessions()

    def go():
        with session_scope(sessions) as s:
            return [_out(j, alias) for j in store.list_jobs(s, adapter.id, limit)]

    return await asyncio.to_thread(go)


@router.get("/v1/adapters/{alias}/imports/{import_id}", response_model=ImportOut)
async def get_import(alias: AliasPath, import_id: uuid.UUID, caller: OpsCaller,
                     state: State) -> ImportOut:
    """One import: status, counts, the malformed records with where they are (ops)."""
    async with state.sessions() as session:
        adapter = await adapter_or_404(session, caller.tenant_id, alias)
    sessions = state.sync_sessions()

    def go():
        with session_scope(sessions) as s:
            job = store.get_job(s, adapter.id, import_id)
            return _out(job, alias) if job is not None else None

    found = await asyncio.to_thread(go)
    if found is None:
        raise ApiError(404, f"import {import_id} not found for this alias", param="import_id",
                       code="import_not_found")
    return found


class AdapterImportOut(BaseModel):
    run_id: uuid.UUID  # the run that gates it (then approval, deploy, watch as usual)
    version_id: uuid.UUID
    lora_name: str
    sha256: str
    base_check: str  # how its base matched the engine's: same model, same name, or asserted
    ignored_files: list[str]


@router.post("/v1/adapters/{alias}/versions", response_model=AdapterImportOut, status_code=202)
async def import_adapter(
    alias: AliasPath, request: Request, caller: OpsCaller, state: State,
    note: Annotated[str, Query(max_length=2000), NoNul] | None = None,
    same_base: bool = False,
) -> AdapterImportOut:
    """Register an adapter trained elsewhere as a new version (ops). The body is a tar (or
    .tar.gz) of its PEFT directory: adapter_config.json + adapter_model.safetensors.

    It is checked and stored now; its run then gates it on the worker, and the alias's approval
    policy decides, as for a version Flywheel trained.
    """

    body = await request.body()
    if not body:
        raise ApiError(422, "the request body must be a tar of the adapter directory",
                       param="body", code="empty_adapter")
    async with state.sessions() as session:
        adapter_id = (await adapter_or_404(session, caller.tenant_id, alias)).id
    settings = state.settings
    policy = state.policies.for_alias(alias, caller.tenant_id)
    sessions = state.sync_sessions()
    received = f"upload of {len(body)} bytes, sha256 {hashlib.sha256(body).hexdigest()}"

    def go():
        root = settings.resolved_artifact_dir
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".upload-") as tmp:
            unpack_tar(body, Path(tmp))
            with session_scope(sessions) as s:
                return register(s, s.get(Adapter, adapter_id), Path(tmp), artifact_dir=root,
                                engine_base=settings.resolved_base_model,
                                max_lora_rank=settings.vllm_max_lora_rank, policy=policy,
                                actor=f"key:{caller.key_id}", note=note, same_base=same_base,
                                received_as=received)

    try:
        done = await asyncio.to_thread(go)
    except AdapterRefused as exc:
        raise ApiError(exc.status, exc.reason, param="body", code=exc.code) from exc
    await asyncio.to_thread(wake_run, state.broker_url, done.run_id)
    return AdapterImportOut(run_id=done.run_id, version_id=done.version_id,
                            lora_name=done.lora_name, sha256=done.sha256,
                            base_check=done.base_check, ignored_files=done.ignored)
