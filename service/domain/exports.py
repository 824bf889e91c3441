"""Edge exports in Postgres: request (deduplicated), claim under a lease, report progress, finish.

Like runs: Postgres is the only source of truth and Celery messages only wake a worker. The
partial unique index uq_exports_one_active makes two identical requests racing (API, CLI and a
promotion) queue one job; a lease makes a duplicate delivery find nothing to claim, and a worker
that died mid-export leaves a lease that expires, so the sweeper hands the job to another.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from service.db import repositories as repo
from service.db.models import Adapter, AdapterVersion, Export, ExportStatus, VersionStatus
from service.domain.policy import ExportSpec
from service.domain.runs import to_json
from service.engine.artifact import file_sha256

# A job whose worker died this many times is given up (it would likely kill the next one too).
MAX_ATTEMPTS = 3


@dataclass
class ExportRefused(Exception):
    """The request cannot be queued; status/code/param map onto the API's error envelope."""

    status: int
    code: str
    reason: str
    param: str | None = None

    def __str__(self) -> str:
        return self.reason


def resolve_version(session: Session, adapter: Adapter, number: int | None) -> AdapterVersion:
    """The version to export: ``number``, else what the alias serves now."""
    if number is None:
        if adapter.serving_version_id is None:
            raise ExportRefused(409, "nothing_to_export",
                                f"alias {adapter.alias!r} serves the base model: promote a version "
                                "or name one with version", "version")
        return repo.get_row(session, AdapterVersion, adapter.serving_version_id)
    version = session.scalars(select(AdapterVersion).where(
        AdapterVersion.adapter_id == adapter.id, AdapterVersion.number == number)).first()
    if version is None:
        raise ExportRefused(404, "version_not_found",
                            f"alias {adapter.alias!r} has no version {number}", "version")
    if version.status == VersionStatus.failed.value:
        raise ExportRefused(409, "version_failed",
                            f"version {number} was refused ({version.failure_reason or 'failed'}): "
                            "export a version that passed its gate", "version")
    return version


def check_spec(fmt: str, quant: str | None) -> ExportSpec:
    """The format/quant pair, validated as the policy's on_promotion entries are."""
    try:
        return ExportSpec(format=fmt, quant=quant)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "quant"
        raise ExportRefused(422, "invalid_export", first["msg"].removeprefix("Value error, "),
                            field) from exc


_REQUEST = text("""
INSERT INTO exports (id, tenant_id, adapter_id, version_id, format, requested_quant, quant,
                     fallback, status, requested_by, files, lineage, progress, metrics, attempts,
                     created_at)
VALUES (:id, :tenant_id, :adapter_id, :version_id, :format, :quant, :quant, :fallback, 'queued',
        :actor, '[]'::jsonb, '{}'::jsonb, '{}'::jsonb, '{}'::jsonb, 0, now())
ON CONFLICT (version_id, format, (coalesce(quant, ''))) WHERE status IN ('queued', 'running')
DO NOTHING
RETURNING id
""")


def request_export(session: Session, version: AdapterVersion, *, fmt: str, quant: str | None,
                   fallback: bool, actor: str, reason: str | None = None) -> tuple[Export, bool]:
    """Queue an export of ``version``; returns (export, created).

    An identical export already queued, running or passed is returned instead of a new one
    (created=False): a passed export is the same bytes, built again for nothing.
    """
    spec = check_spec(fmt, quant)
    existing = _same(session, version.id, spec, (ExportStatus.passed.value,
                                                 ExportStatus.queued.value,
                                                 ExportStatus.running.value))
    if existing is not None:
        return existing, False
    adapter = repo.get_row(session, Adapter, version.adapter_id)
    new_id = session.execute(_REQUEST, {
        "id": uuid.uuid4(), "tenant_id": adapter.tenant_id, "adapter_id": adapter.id,
        "version_id": version.id, "format": spec.format, "quant": spec.quant,
        "fallback": fallback, "actor": actor}).scalar()
    if new_id is None:  # lost a race with an identical request
        raced = _same(session, version.id, spec, (ExportStatus.queued.value,
                                                  ExportStatus.running.value))
        if raced is not None:
            return raced, False
        raise ExportRefused(409, "export_conflict", "an identical export just finished; retry")
    repo.audit(session, tenant_id=adapter.tenant_id, actor=actor, action="export.requested",
               target_type="export", target_id=str(new_id), reason=reason,
               detail={"version": version.lora_name, "format": spec.format, "quant": spec.quant,
                       "fallback": fallback})
    export = session.get(Export, new_id)
    assert export is not None  # inserted above, in this transaction
    return export, True


def _same(session: Session, version_id: uuid.UUID, spec: ExportSpec,
          statuses: tuple[str, ...]) -> Export | None:
    q = (select(Export).where(Export.version_id == version_id, Export.format == spec.format,
                              Export.requested_quant.is_not_distinct_from(spec.quant),
                              Export.status.in_(statuses))
         .order_by(Export.created_at.desc()))
    return session.scalars(q).first()


_CLAIM = text("""
UPDATE exports SET status = 'running', lease_owner = :owner,
       lease_expires_at = now() + make_interval(secs => :lease_s), attempts = attempts + 1,
       started_at = coalesce(started_at, now())
WHERE id = :id AND attempts < :max_attempts
  AND (status = 'queued' OR (status = 'running' AND lease_expires_at < now()))
RETURNING id
""")


def claim(session: Session, export_id: uuid.UUID, owner: str, lease_s: float) -> bool:
    """Take the job (queued, or running under an expired lease); False if there is nothing to do."""
    return session.execute(_CLAIM, {"id": export_id, "owner": owner, "lease_s": lease_s,
                                    "max_attempts": MAX_ATTEMPTS}).first() is not None


_RENEW = text("""
UPDATE exports SET progress = coalesce(CAST(:progress AS jsonb), progress),
       lease_expires_at = now() + make_interval(secs => :lease_s)
WHERE id = :id AND lease_owner = :owner AND status = 'running'
RETURNING id
""")


def report(session: Session, export_id: uuid.UUID, owner: str, lease_s: float,
           progress: dict[str, Any] | None) -> bool:
    """Extend the lease (and record progress, if given); False when this worker no longer holds
    the job."""
    return session.execute(_RENEW, {"id": export_id, "owner": owner, "lease_s": lease_s,
                                    "progress": None if progress is None else to_json(progress)}
                           ).first() is not None


def finish(session: Session, export_id: uuid.UUID, owner: str, status: ExportStatus,
           **fields: Any) -> bool:
    """Move a running job to passed/failed/error with its results; False if the lease was lost."""
    export = session.scalars(select(Export).where(
        Export.id == export_id, Export.lease_owner == owner,
        Export.status == ExportStatus.running.value).with_for_update()).first()
    if export is None:
        return False
    for name, value in fields.items():
        setattr(export, name, value)
    export.status = status.value
    export.lease_owner = export.lease_expires_at = None
    export.finished_at = func.now()  # one UPDATE with the rest at flush
    return True


_CLAIMABLE = text("""
SELECT id FROM exports
WHERE attempts < :max_attempts
  AND (status = 'queued' OR (status = 'running' AND lease_expires_at < now()))
ORDER BY created_at
""")

_GIVE_UP = text("""
UPDATE exports SET status = 'error', lease_owner = NULL, lease_expires_at = NULL,
       finished_at = now(),
       failure_reason = 'gave up after ' || attempts || ' attempts: the worker died during each '
                        '(out of memory?); see the worker log'
WHERE attempts >= :max_attempts
  AND (status = 'queued' OR (status = 'running' AND lease_expires_at < now()))
RETURNING id, tenant_id
""")


def claimable_exports(session: Session) -> list[uuid.UUID]:
    """Jobs no worker holds (what the sweeper re-enqueues); gives up on ones that keep dying."""
    for export_id, tenant_id in session.execute(_GIVE_UP, {"max_attempts": MAX_ATTEMPTS}).all():
        repo.audit(session, tenant_id=tenant_id, actor="sweeper", action="export.error",
                   target_type="export", target_id=str(export_id),
                   reason=f"gave up after {MAX_ATTEMPTS} attempts")
    return list(session.scalars(_CLAIMABLE, {"max_attempts": MAX_ATTEMPTS}))


def file_path(export: Export, name: str) -> Path | None:
    """The on-disk path of a manifest file of the export, or None when it is missing, outside the
    export's directory, or not the size and sha256 the manifest recorded.

    Blocking (hashes the file unless this process hashed the same unchanged file before: same
    inode, size and modification time): call it through a thread from async code."""
    entry = next((f for f in export.files or [] if f["name"] == name), None)
    if entry is None or not export.path:
        return None
    root = Path(export.path).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    st = path.stat()
    if st.st_size != entry["bytes"]:
        return None
    stamp = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if _VERIFIED.get(stamp) != entry["sha256"]:
        if file_sha256(path) != entry["sha256"]:
            return None
        if len(_VERIFIED) >= 4096:
            _VERIFIED.clear()
        _VERIFIED[stamp] = entry["sha256"]
    return path


# (path, inode, size, mtime) -> the sha256 it was verified to have. Rewriting a file in place
# changes its mtime, replacing it changes its inode, so a stale entry is never matched.
_VERIFIED: dict[tuple, str] = {}


def delete_export(session: Session, export: Export, *, actor: str, reason: str | None) -> list[Path]:
    """Mark a settled export deleted (the row stays for the audit trail); returns the directories
    to remove with :func:`remove_files` once this transaction has committed, so a failed commit
    never leaves a "passed" export without its files. Refused while a worker is building it."""
    if export.status in (ExportStatus.queued.value, ExportStatus.running.value):
        raise ExportRefused(409, "export_in_progress",
                            f"export is {export.status}: wait for it to finish, then delete it",
                            "export_id")
    if export.status == ExportStatus.deleted.value:
        return []
    doomed = []
    if export.path:
        doomed.append(Path(export.path))
        # The job's directory (exports/<id>) holds only this delivered artifact.
        if Path(export.path).parent.name == str(export.id):
            doomed.append(Path(export.path).parent)
    export.status, export.path, export.files = ExportStatus.deleted.value, None, []
    repo.audit(session, tenant_id=export.tenant_id, actor=actor, action="export.deleted",
               target_type="export", target_id=str(export.id), reason=reason,
               detail={"sha256": export.sha256, "bytes": export.bytes})
    return doomed


def remove_files(paths: list[Path]) -> None:
    """Remove what delete_export returned (after its commit)."""

    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
