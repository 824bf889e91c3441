"""Edge exports of an alias's versions (ops): request one as a background job, follow it,
download its files with their checksums."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError
from sqlalchemy import select

from service.api import download_links as links
from service.api.deps import OpsCaller, State
from service.api.errors import ApiError
from service.api.export_views import ExportOut, export_out, list_for_adapter
from service.api.lookups import adapter_or_404
from service.api.schemas import AliasPath, NoNul
from service.db.models import AdapterVersion, Export, ExportStatus
from service.domain import exports as domain
from service.domain.policy import ExportFormat, ExportQuant
from service.wakeup import wake_export

router = APIRouter(tags=["exports"])

# A manifest name: relative, no "..", no leading slash (it is only ever matched against the
# manifest, but a clear 404 beats a lookup of a strange string).
_FILE_NAME = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: ExportFormat
    quant: ExportQuant | None = None
    version: int | None = Field(default=None, ge=1, description="Version number; default: serving")
    fallback: bool | None = Field(default=None, description="Default: the policy's export.fallback")
    reason: Annotated[str, NoNul] | None = Field(default=None, max_length=2000)


async def _export(session, adapter_id: uuid.UUID, export_id: uuid.UUID
                  ) -> tuple[Export, AdapterVersion]:
    row = (await session.execute(
        select(Export, AdapterVersion).join(AdapterVersion, AdapterVersion.id == Export.version_id)
        .where(Export.id == export_id, Export.adapter_id == adapter_id))).first()
    if row is None:
        raise ApiError(404, f"export {export_id} not found for this alias", param="export_id",
                       code="export_not_found")
    return row[0], row[1]


@router.post("/v1/adapters/{alias}/exports", response_model=ExportOut, status_code=202,
             responses={200: {"description": "An identical export is already queued, running or "
                                             "passed: that one is returned"}})
async def request_export(alias: AliasPath, body: ExportRequest, caller: OpsCaller,
                         state: State) -> Any:
    """Export a version (default: the serving one) as a merged model or a GGUF (ops).

    Runs as a background job on a worker; poll the returned export for progress and result.
    """
    async with state.sessions() as session, session.begin():
        adapter = await adapter_or_404(session, caller.tenant_id, alias)
        policy = state.policies.for_alias(alias, caller.tenant_id)
        fallback = policy.export.fallback if body.fallback is None else body.fallback

        def go(s):
            version = domain.resolve_version(s, adapter, body.version)
            export, created = domain.request_export(
                s, version, fmt=body.format, quant=body.quant, fallback=fallback,
                actor=f"key:{caller.key_id}", reason=body.reason)
            return export, version, created

        try:
            export, version, created = await session.run_sync(go)
        except domain.ExportRefused as exc:
            raise ApiError(exc.status, exc.reason, param=exc.param, code=exc.code) from exc
        out = export_out(export, version)
    if created:
        # After the commit: a worker must find the row. A lost wake-up is re-sent by the sweeper.
        await asyncio.to_thread(wake_export, state.broker_url, export.id)
    return JSONResponse(out.model_dump(mode="json"), status_code=202 if created else 200)


@router.get("/v1/adapters/{alias}/exports", response_model=list[ExportOut])
async def list_exports(alias: AliasPath, caller: OpsCaller, state: State) -> list[ExportOut]:
    """The alias's exports, newest first (also in GET /v1/adapters/{alias})."""
    async with state.sessions() as session:
        adapter = await adapter_or_404(session, caller.tenant_id, alias)
        return await list_for_adapter(session, adapter.id)


@router.get("/v1/adapters/{alias}/exports/{export_id}", response_model=ExportOut)
async def get_export(alias: AliasPath, export_id: uuid.UUID, caller: OpsCaller,
                     state: State) -> ExportOut:
    """One export: progress while it runs; then its files, checksums, gate numbers and lineage."""
    async with state.sessions() as session:
        adapter = await adapter_or_404(session, caller.tenant_id, alias)
        export, version = await _export(session, adapter.id, export_id)
    return export_out(export, version, detail=True)


class DeleteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, NoNul] | None = Field(default=None, max_length=2000)


@router.delete("/v1/adapters/{alias}/exports/{export_id}", response_model=ExportOut)
async def delete_export(alias: AliasPath, export_id: uuid.UUID, caller: OpsCaller, state: State,
                        body: DeleteBody | None = None) -> ExportOut:
    """Delete a settled export's files (ops); the record stays, marked deleted, for the audit."""
    async with state.sessions() as session, session.begin():
        adapter = await adapter_or_404(session, caller.tenant_id, alias)
        export, version = await _export(session, adapter.id, export_id)
        try:
            doomed = await session.run_sync(lambda s: domain.delete_export(
                s, export, actor=f"key:{caller.key_id}",
                reason=body.reason if body else None))
        except domain.ExportRefused as exc:
            raise ApiError(exc.status, exc.reason, param=exc.param, code=exc.code) from exc
        await session.flush()
        out = export_out(export, version, detail=True)
    await asyncio.to_thread(domain.remove_files, doomed)
    return out


@router.get("/v1/adapters/{alias}/exports/{export_id}/files/{name:path}",
            response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": "The file; X-Checksum-Sha256 carries its sha256"}})
async def download_export_file(alias: AliasPath, export_id: uuid.UUID,
                               name: Annotated[str, Path(min_length=1, max_length=300)],
                               caller: OpsCaller, state: State) -> FileResponse:
    """Download one file of a passed export (model.gguf, Modelfile, lineage.json, ...)."""
    async with state.sessions() as session:
        adapter = await adapter_or_404(session, caller.tenant_id, alias)
        export, _ = await _export(session, adapter.id, export_id)
    return await _file_response(export, name)


def _entry(export: Export, name: str) -> dict[str, Any]:
    """The manifest entry of a downloadable file, or the error that says why not."""
    if export.status != ExportStatus.passed.value:
        raise ApiError(409, f"export is {export.status}: only a passed export can be downloaded",
                       param="export_id", code="export_not_passed")
    entry = next((f for f in export.files or [] if f["name"] == name), None)
    if entry is None or not _FILE_NAME.fullmatch(name):
        names = ", ".join(f["name"] for f in export.files or [])
        raise ApiError(404, f"export has no file {name!r} (it has: {names})", param="name",
                       code="export_file_not_found")
    return entry


async def _file_response(export: Export, name: str) -> FileResponse:
    entry = _entry(export, name)
    # Size and sha256 checked on every download (the hash is reused only for the same unchanged
    # file): what leaves is what the consistency gate passed.
    path = await asyncio.to_thread(domain.file_path, export, name)
    if path is None:
        raise ApiError(410, f"{name} is no longer on the artifact disk, or its size or sha256 "
                       "changed since it was exported: export again", param="name",
                       code="export_file_gone")
    return FileResponse(path, media_type="application/octet-stream", filename=path.name,
                        headers={"X-Checksum-Sha256": entry["sha256"],
                                 "ETag": f'"{entry["sha256"]}"'})


class LinkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=300, description="A file of the export's manifest")
    one_time: bool = Field(False, description="The link opens one download, then is gone")


class LinkOut(BaseModel):
    url: str
    expires_in_s: int
    name: str
    bytes: int
    sha256: str
    one_time: bool


def _redis_down(state, exc: Exception) -> ApiError:
    return ApiError(503, f"download links need Redis, which is unreachable ({type(exc).__name__})",
                    code="broker_unavailable",
                    headers={"Retry-After": str(state.settings.retry_after_s)})


@router.post("/v1/adapters/{alias}/exports/{export_id}/links", response_model=LinkOut,
             status_code=201)
async def create_download_link(alias: AliasPath, export_id: uuid.UUID, body: LinkRequest,
                               caller: OpsCaller, state: State) -> LinkOut:
    """A short-lived URL for one file (ops): it needs no Authorization header, so a browser or
    curl streams a multi-GB GGUF straight to disk. Anyone holding it can download until it
    expires (FLYWHEEL_DOWNLOAD_LINK_TTL_S), or, with `one_time`, for one download."""
    async with state.sessions() as session:
        adapter = await adapter_or_404(session, caller.tenant_id, alias)
        export, _ = await _export(session, adapter.id, export_id)
    entry = _entry(export, body.name)
    ttl = state.settings.download_link_ttl_s
    try:
        token = await links.create_link(
            state.redis, links.LinkTarget(export.id, body.name, caller.tenant_id), ttl,
            one_time=body.one_time)
    except (RedisError, OSError) as exc:
        raise _redis_down(state, exc) from exc
    return LinkOut(url=f"/v1/downloads/{token}", expires_in_s=ttl, name=body.name,
                   bytes=entry["bytes"], sha256=entry["sha256"], one_time=body.one_time)


@router.get("/v1/downloads/{token}", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
async def download_by_link(token: Annotated[str, Path(min_length=20, max_length=100)],
                           state: State) -> FileResponse:
    """Download the file a link opens (no key: the link is the credential, until it expires or,
    one-time, is used)."""
    try:
        target = await links.resolve_link(state.redis, token)
    except (RedisError, OSError) as exc:
        raise _redis_down(state, exc) from exc
    if target is None:
        raise ApiError(404, "download link unknown or expired: ask for a new one", param="token",
                       code="link_not_found")
    async with state.sessions() as session:
        export = (await session.scalars(select(Export).where(
            Export.id == target.export_id, Export.tenant_id == target.tenant_id))).first()
    if export is None:
        raise ApiError(404, "the export of this link no longer exists", code="export_not_found")
    # Checked again: the export may have been deleted since the link was made.
    return await _file_response(export, target.name)
