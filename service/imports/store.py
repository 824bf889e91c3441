"""Writing imported records into an alias's feedback buffer, as one job row with its counts.

Each record's interaction and feedback go in under one savepoint, so a record is written whole
or not at all; records are committed in batches, and the job row's counts are updated in the
same transaction as the batch they count, so the counts always match what is stored. The
unique index on (tenant_id, source, source_id) makes a record imported before (by this job or an
earlier one, from the CLI or the API, racing or not) a skip, never a second row.

Imported interactions are told apart from served ones by `source` (and `served_model`
"import:<source>", version_id NULL: no Flywheel version answered them). Their feedback draws
`seq` from the same sequence as live ratings, so it counts toward the trigger the same way.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.db import repositories as repo
from service.db.models import JUDGE_RATER_PREFIX, Adapter, FeedbackImport, ImportStatus
from service.db.session import session_scope
from service.domain import trigger
from service.domain.policy import Policy
from service.imports.records import ImportRecord, ParsedFile, RatingRule, RecordError, Unrated

log = logging.getLogger(__name__)

BATCH = 200
MAX_ERROR_SAMPLES = 200  # reported records kept on the job row (all are counted)
# A running job commits a batch every few hundred milliseconds; one silent this long was stopped
# (its process died or was restarted) and is marked failed when next read.
STALE_AFTER_S = 120

_INSERT_INTERACTION = text("""
INSERT INTO interactions (id, tenant_id, api_key_id, alias, adapter_id, version_id, served_model,
    replica, "user", messages, params, response_text, response_tool_calls, finish_reason, stream,
    created_at, source, source_id, import_id)
VALUES (:id, :tenant_id, :api_key_id, :alias, :adapter_id, NULL, :served_model, NULL, :user,
    CAST(:messages AS jsonb), CAST(:params AS json), :response_text,
    CAST(:response_tool_calls AS jsonb), NULL, false,
    COALESCE(CAST(:created_at AS timestamptz), now()), :source, :source_id, :import_id)
ON CONFLICT (tenant_id, source, source_id) WHERE source IS NOT NULL DO NOTHING
RETURNING id
""")

# created_at is when the rating reached Flywheel's buffer (the trigger's interval and the watch
# window read it); the interaction keeps the time it happened at the source.
_INSERT_FEEDBACK = text("""
INSERT INTO feedback (id, interaction_id, tenant_id, adapter_id, version_id, rater_id, rating,
                      correction, comment, api_key_id, created_at, updated_at)
VALUES (:id, :interaction_id, :tenant_id, :adapter_id, NULL, :rater_id, :rating, :correction,
        :comment, :api_key_id, now(), now())
""")


def served_model_for(source: str) -> str:
    """What imported interactions show as `served_model`: no Flywheel version answered them."""
    return f"import:{source}"


def _clean(value: Any) -> Any:
    """Postgres text and jsonb cannot hold U+0000: stored as U+FFFD, like the gateway does."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return value


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(_clean(value), ensure_ascii=False)


@dataclass
class Tally:
    """Running counts of a job (what its row says after each batch)."""

    imported: int = 0
    skipped: int = 0
    errors: int = 0
    skipped_reasons: Counter = field(default_factory=Counter)
    error_samples: list[dict[str, str]] = field(default_factory=list)

    def error(self, where: str, reason: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append({"where": where, "reason": reason})

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.skipped_reasons[reason] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"imported": self.imported, "skipped": self.skipped, "errors": self.errors,
                "skipped_reasons": dict(self.skipped_reasons),
                "error_samples": list(self.error_samples)}


def create_job(session: Session, adapter: Adapter, parsed: ParsedFile, *, actor: str,
               rule: RatingRule, file_name: str | None) -> FeedbackImport:
    """The job row, before any record is written (status running, counts zero)."""
    job = FeedbackImport(
        tenant_id=adapter.tenant_id, adapter_id=adapter.id, source=parsed.source,
        status=ImportStatus.running.value, requested_by=actor,
        file_name=(file_name or None) and _clean(file_name)[:500], file_sha256=parsed.sha256,
        file_bytes=parsed.size, options=rule.as_dict(), total=len(parsed.items),
        imported=0, skipped=0, errors=0, skipped_reasons={}, error_samples=[])
    session.add(job)
    session.flush()
    repo.audit(session, tenant_id=adapter.tenant_id, actor=actor, action="feedback.import",
               target_type="import", target_id=str(job.id),
               detail={"alias": adapter.alias, "source": parsed.source, "records": job.total,
                       "file_sha256": parsed.sha256})
    return job


def _write_record(session: Session, job: dict[str, Any], record: ImportRecord) -> bool:
    """Insert one record's interaction and feedback; False when the source already gave it."""
    iid = session.execute(_INSERT_INTERACTION, {
        "id": uuid.uuid4(), "tenant_id": job["tenant_id"], "api_key_id": job["api_key_id"],
        "alias": job["alias"], "adapter_id": job["adapter_id"],
        "served_model": served_model_for(job["source"]), "user": _clean(record.user),
        "messages": _json(record.messages), "params": _json(record.params or {}),
        "response_text": _clean(record.response_text),
        "response_tool_calls": _json(record.response_tool_calls),
        "created_at": record.created_at, "source": job["source"],
        "source_id": _clean(record.source_id), "import_id": job["id"]}).scalar()
    if iid is None:
        return False
    session.execute(_INSERT_FEEDBACK, {
        "id": uuid.uuid4(), "interaction_id": iid, "tenant_id": job["tenant_id"],
        "adapter_id": job["adapter_id"], "rater_id": _rater(record.rater_id),
        "rating": record.rating, "correction": _clean(record.correction),
        "comment": _clean(record.comment), "api_key_id": job["api_key_id"]})
    return True


def _rater(rater_id: str | None) -> str:
    """The imported rater's id; one named like the AI judge (judge:*) is kept apart from it."""
    rater = _clean(rater_id or "")
    if rater.lower().startswith(JUDGE_RATER_PREFIX):
        rater = f"imported:{rater}"
    return rater[:200]


def _save_tally(session: Session, job_id: uuid.UUID, tally: Tally, **more: Any) -> None:
    sets = {"imported": tally.imported, "skipped": tally.skipped, "errors": tally.errors,
            "skipped_reasons": _json(dict(tally.skipped_reasons)),
            "error_samples": _json(tally.error_samples), "id": job_id, **more}
    extra = "".join(f", {k} = :{k}" for k in more)
    session.execute(text(f"""UPDATE feedback_imports SET imported = :imported,
        skipped = :skipped, errors = :errors,
        skipped_reasons = CAST(:skipped_reasons AS jsonb),
        error_samples = CAST(:error_samples AS jsonb), updated_at = now(){extra}
        WHERE id = :id"""), sets)


def run_job(sessions: sessionmaker, job_id: uuid.UUID, parsed: ParsedFile, policy: Policy, *,
            api_key_id: uuid.UUID | None = None, batch_size: int = BATCH,
            on_progress: Callable[[int, Tally], None] | None = None) -> FeedbackImport:
    """Write every record of `parsed` under the job, then run the alias's trigger once.

    Returns the finished job row (status done, or failed with the reason when the database gave
    out midway: the batches committed before stay, and importing the file again adds the rest).
    """
    with session_scope(sessions) as s:
        row = repo.get_row(s, FeedbackImport, job_id)
        adapter = repo.get_row(s, Adapter, row.adapter_id)
        job = {"id": row.id, "tenant_id": row.tenant_id, "adapter_id": adapter.id,
               "alias": adapter.alias, "source": row.source, "api_key_id": api_key_id}
        s.execute(text("UPDATE feedback_imports SET started_at = now(), updated_at = now() "
                       "WHERE id = :id"), {"id": job_id})
    tally = Tally()
    done = 0
    try:
        for start in range(0, len(parsed.items), batch_size):
            batch = parsed.items[start:start + batch_size]
            with session_scope(sessions) as s:
                for item in batch:
                    _one(s, job, item.where, item.value, tally)
                _save_tally(s, job_id, tally)
            done += len(batch)
            if on_progress is not None:
                on_progress(done, tally)
    except Exception as exc:  # noqa: BLE001 - recorded on the job; the committed batches stay
        log.exception("import %s stopped after %d of %d records", job_id, done, len(parsed.items))
        final = dict(status=ImportStatus.failed.value,
                     failure_reason=f"stopped after {done} of {len(parsed.items)} records "
                                    f"({type(exc).__name__}: {str(exc)[:500]}); import the "
                                    "same file again to add the rest")
    else:
        final = dict(status=ImportStatus.done.value)
    # The run first: whoever sees the job finished also sees the run it started.
    _start_run(sessions, job_id, job, policy, tally)
    with session_scope(sessions) as s:
        _save_tally(s, job_id, tally, finished_at=datetime.now().astimezone(), **final)
    return _audit(sessions, job_id, job, tally)


def _one(session: Session, job: dict[str, Any], where: str, value: Any, tally: Tally) -> None:
    if isinstance(value, RecordError):
        tally.error(where, value.reason)
        return
    if isinstance(value, Unrated):
        tally.skip(value.reason)
        return
    try:
        with session.begin_nested():
            written = _write_record(session, job, value)
    except OperationalError:
        raise  # the database is gone: the whole job stops (what is committed stays)
    except DBAPIError as exc:  # this record alone: its savepoint is rolled back
        tally.error(where, f"the database refused it: {type(exc.orig).__name__}: "
                           f"{str(exc.orig).splitlines()[0][:300]}")
        return
    if written:
        tally.imported += 1
    else:
        tally.skip("already_imported")


def _start_run(sessions: sessionmaker, job_id: uuid.UUID, job: dict[str, Any], policy: Policy,
               tally: Tally) -> None:
    """Imported ratings count like live ones: check the alias's trigger once, at the end (one run
    takes the whole import instead of the first batch that crossed the threshold)."""
    if tally.imported:
        try:
            with session_scope(sessions) as s:
                run_id = trigger.start_run_if_due(s, job["adapter_id"], policy)
                if run_id is not None:
                    s.execute(text("UPDATE feedback_imports SET run_id = :r WHERE id = :id"),
                              {"r": run_id, "id": job_id})
        except Exception as exc:  # noqa: BLE001 - the sweeper runs the same check on its round
            log.warning("trigger check after import %s failed: %s", job_id, type(exc).__name__)


def _audit(sessions: sessionmaker, job_id: uuid.UUID, job: dict[str, Any], tally: Tally
           ) -> FeedbackImport:
    """The import's audit event; returns its final row."""
    with session_scope(sessions) as s:
        row = repo.get_row(s, FeedbackImport, job_id)
        repo.audit(s, tenant_id=job["tenant_id"], actor=row.requested_by,
                   action=f"feedback.import.{row.status}",
                   target_type="import", target_id=str(job_id),
                   reason=row.failure_reason,
                   detail={"alias": job["alias"], "source": job["source"], **tally.as_dict(),
                           "error_samples": tally.error_samples[:10],
                           "run_id": str(row.run_id) if row.run_id else None})
        s.flush()
        s.expunge(row)
    return row


def dry_run(session: Session, tenant_id: str, parsed: ParsedFile) -> dict[str, Any]:
    """What an import of `parsed` would do, writing nothing: each record would be imported,
    skipped (already imported, or no rating) or reported."""
    tally = Tally()
    ids = [r.source_id for _, r in parsed.records]
    present = set(session.scalars(text(
        "SELECT source_id FROM interactions WHERE tenant_id = :t AND source = :s "
        "AND source_id = ANY(:ids)"), {"t": tenant_id, "s": parsed.source, "ids": ids}))
    for item in parsed.items:
        v = item.value
        if isinstance(v, RecordError):
            tally.error(item.where, v.reason)
        elif isinstance(v, Unrated):
            tally.skip(v.reason)
        elif v.source_id in present:
            tally.skip("already_imported")
        else:
            present.add(v.source_id)  # a second copy in the same file is a skip too
            tally.imported += 1
    return {"dry_run": True, "source": parsed.source, "file_sha256": parsed.sha256,
            "file_bytes": parsed.size, "total": len(parsed.items), **tally.as_dict()}


def mark_stale(session: Session, adapter_id: uuid.UUID) -> None:
    """Running jobs whose process stopped (no batch for STALE_AFTER_S) become failed, saying so."""
    session.execute(text("""
        UPDATE feedback_imports SET status = 'failed', finished_at = now(),
            failure_reason = 'interrupted: the process running it stopped after '
                || (imported + skipped + errors) || ' of ' || total
                || ' records; import the same file again to add the rest'
        WHERE adapter_id = :a AND status = 'running'
          AND updated_at < now() - make_interval(secs => :stale)"""),
                    {"a": adapter_id, "stale": STALE_AFTER_S})


def list_jobs(session: Session, adapter_id: uuid.UUID, limit: int = 50) -> list[FeedbackImport]:
    mark_stale(session, adapter_id)
    return list(session.scalars(select(FeedbackImport).where(FeedbackImport.adapter_id == adapter_id)
                                .order_by(FeedbackImport.created_at.desc()).limit(limit)))


def get_job(session: Session, adapter_id: uuid.UUID, job_id: uuid.UUID) -> FeedbackImport | None:
    mark_stale(session, adapter_id)
    return session.scalars(select(FeedbackImport).where(
        FeedbackImport.id == job_id, FeedbackImport.adapter_id == adapter_id)).first()


def lineage(session: Session, interaction_ids: list[str], heldout_ids: list[str]) -> list[dict]:
    """Which of a dataset's interactions came from which import: per import, its source and
    the interaction ids (split into training and held-out). [] when none was imported."""
    if not interaction_ids:
        return []
    rows = session.execute(text("""
        SELECT i.id::text AS id, i.import_id, i.source, j.file_sha256
        FROM interactions i LEFT JOIN feedback_imports j ON j.id = i.import_id
        WHERE i.id = ANY(CAST(:ids AS uuid[])) AND i.source IS NOT NULL
        ORDER BY i.id"""), {"ids": interaction_ids}).all()
    heldout = set(heldout_ids)
    by_import: dict[str, dict[str, Any]] = {}
    for r in rows:
        key = str(r.import_id) if r.import_id else f"{r.source}:deleted-import"
        entry = by_import.setdefault(key, {"import_id": str(r.import_id) if r.import_id else None,
                                           "source": r.source, "file_sha256": r.file_sha256,
                                           "train_ids": [], "heldout_ids": []})
        entry["heldout_ids" if r.id in heldout else "train_ids"].append(r.id)
    return [{**e, "train": len(e["train_ids"]), "heldout": len(e["heldout_ids"])}
            for e in by_import.values()]


def imported_from(sessions: sessionmaker, snapshot: Any) -> list[dict]:
    """`lineage` for a built dataset's snapshot (workers/dataset.py Snapshot), in its own
    transaction: what a run's lineage records about imports."""
    with session_scope(sessions) as s:
        return lineage(s, list(snapshot.interaction_ids), list(snapshot.heldout_ids))
