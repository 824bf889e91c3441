"""SQLAlchemy 2 models. Changes to this file need an Alembic migration in migrations/versions."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    Sequence,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSON, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSONB, list[Any]: JSONB}


Base.metadata.naming_convention = NAMING


def _uuid() -> uuid.UUID:
    return uuid.uuid4()


class Role(str, enum.Enum):
    product = "product"
    ops = "ops"


class Rating(str, enum.Enum):
    up = "up"
    down = "down"


class RunState(str, enum.Enum):
    pending = "pending"
    training = "training"
    evaluating = "evaluating"
    awaiting_approval = "awaiting_approval"
    approved = "approved"
    rejected = "rejected"
    deploying = "deploying"
    canary = "canary"
    live = "live"
    superseded = "superseded"
    rolled_back = "rolled_back"
    failed = "failed"


# A run in one of these states blocks a new run for the same adapter (exactly-once trigger).
ACTIVE_RUN_STATES = (
    RunState.pending,
    RunState.training,
    RunState.evaluating,
    RunState.awaiting_approval,
    RunState.approved,
    RunState.deploying,
)


class VersionStatus(str, enum.Enum):
    candidate = "candidate"  # trained, not yet served
    staged = "staged"  # loaded under its name for evaluation / canary
    live = "live"  # the alias serves it
    warm = "warm"  # previous live version, kept loaded for instant rollback
    retired = "retired"  # unloaded, artifact kept
    failed = "failed"  # refused by verification, swap or gate


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=_uuid)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    # Shown in listings so a key can be recognised without storing it.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Adapter(Base):
    """An alias a product calls as `model`, e.g. "support-bot"."""

    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_id", "alias", name="uq_adapters_tenant_alias"),)

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=_uuid)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    alias: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text, default="")
    # NULL means the alias serves the base model.
    serving_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("adapter_versions.id", use_alter=True, ondelete="SET NULL")
    )
    previous_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("adapter_versions.id", use_alter=True, ondelete="SET NULL")
    )
    canary_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("adapter_versions.id", use_alter=True, ondelete="SET NULL")
    )
    canary_share: Mapped[float] = mapped_column(Float, default=0.0)
    # Highest feedback.seq consumed by a run; the trigger counts feedback above it.
    feedback_watermark: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class AdapterVersion(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "number", name="uq_adapter_versions_number"),)

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=_uuid)
    adapter_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    # Never reused: vLLM may serve stale prefix-cache blocks for a reloaded name (vllm #42125).
    lora_name: Mapped[str] = mapped_column(String(200), unique=True)
    status: Mapped[str] = mapped_column(String(16), default=VersionStatus.candidate.value)
    artifact_path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    parent_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL")
    )
    run_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("training_runs.id", use_alter=True, ondelete="SET NULL")
    )
    lineage: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Interaction(Base):
    """One chat completion served by the gateway."""

    __tablename__ = "interactions"
    __table_args__ = (
        Index("ix_interactions_tenant_created", "tenant_id", "created_at"),
        Index("ix_interactions_adapter_created", "adapter_id", "created_at"),
        # Partial: the gateway's rows (source NULL) write no entry on the hot path.
        Index("uq_interactions_source", "tenant_id", "source", "source_id", unique=True,
              postgresql_where=text("source IS NOT NULL")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=_uuid)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL")
    )
    alias: Mapped[str] = mapped_column(String(100))
    adapter_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("adapters.id", ondelete="SET NULL"))
    version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL")
    )
    # The engine model name that answered (a lora_name, or the base model's name).
    served_model: Mapped[str] = mapped_column(String(200))
    replica: Mapped[str | None] = mapped_column(String(300))
    user: Mapped[str | None] = mapped_column(String(200))
    messages: Mapped[list[Any]] = mapped_column(JSONB)
    # json, not jsonb: kept as sent (key order included), since templates dump tools as JSON.
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    response_text: Mapped[str] = mapped_column(Text, default="")
    # The answer's tool calls (OpenAI's list), when it called tools.
    response_tool_calls: Mapped[list[Any] | None] = mapped_column(JSONB)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Where an imported interaction came from ("openwebui", "langfuse", "jsonl") and its id
    # there; NULL for what the gateway served. Unique per tenant (uq_interactions_source), so
    # importing a record twice adds nothing.
    source: Mapped[str | None] = mapped_column(String(32))
    source_id: Mapped[str | None] = mapped_column(String(300))
    import_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("feedback_imports.id", ondelete="SET NULL")
    )


# Drawn again on every feedback upsert, so a replaced rating counts as new for the trigger.
FEEDBACK_SEQ = Sequence("feedback_seq_seq", metadata=Base.metadata)


FEEDBACK_SOURCE_HUMAN, FEEDBACK_SOURCE_JUDGE = "human", "judge"
JUDGE_RATER_PREFIX = "judge:"  # reserved: no product or import may rate under it


class Feedback(Base):
    """A rating of one interaction by one rater; posting again replaces it."""

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("interaction_id", "rater_id", name="uq_feedback_interaction_rater"),
        # The trigger's hot query: new feedback for an adapter above its watermark.
        Index("ix_feedback_adapter_seq", "adapter_id", "seq"),
        # The judge's ratings of an alias (agreement, caps); partial: human ratings skip it.
        Index("ix_feedback_judge", "adapter_id", "interaction_id",
              postgresql_where=text("source = 'judge'")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=_uuid)
    # Re-drawn from feedback_seq_seq on every upsert so a replaced rating counts as new.
    seq: Mapped[int] = mapped_column(
        BigInteger, server_default=FEEDBACK_SEQ.next_value(), unique=True
    )
    interaction_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("interactions.id", ondelete="CASCADE")
    )
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    adapter_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("adapters.id", ondelete="SET NULL"))
    version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL")
    )
    rater_id: Mapped[str] = mapped_column(String(200), default="")
    rating: Mapped[str] = mapped_column(String(8))
    # "human" (posted or imported) or "judge" (workers.judge; rater_id "judge:<model>").
    source: Mapped[str] = mapped_column(String(16), server_default=FEEDBACK_SOURCE_HUMAN)
    correction: Mapped[str | None] = mapped_column(Text)
    comment: Mapped[str | None] = mapped_column(Text)
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class TrainingRun(Base):
    __tablename__ = "training_runs"
    __table_args__ = (
        # Exactly one active run per adapter, whatever the number of API processes racing.
        Index(
            "uq_training_runs_one_active",
            "adapter_id",
            unique=True,
            postgresql_where=text(
                "state IN ('pending','training','evaluating','awaiting_approval','approved','deploying')"
            ),
        ),
        Index("ix_training_runs_state", "state"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=_uuid)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    adapter_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(24), default=RunState.pending.value)
    method: Mapped[str | None] = mapped_column(String(8))
    method_reason: Mapped[str | None] = mapped_column(Text)
    trigger: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    policy: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    feedback_seq_from: Mapped[int] = mapped_column(BigInteger, default=0)
    feedback_seq_to: Mapped[int] = mapped_column(BigInteger, default=0)
    parent_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL")
    )
    candidate_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL")
    )
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    dataset_stats: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    verdict: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    # The training job the train stage submitted (workers/trainer/): backend, reference, attempt.
    trainer_job: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class EvalResult(Base):
    __tablename__ = "eval_results"
    __table_args__ = (Index("ix_eval_results_run", "run_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"))
    version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL")
    )
    # What was measured: "candidate", "serving" or "base".
    subject: Mapped[str] = mapped_column(String(16))
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float | None] = mapped_column(Float)
    passed: Mapped[bool | None] = mapped_column(Boolean)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AuditEvent(Base):
    """Who did what, when and why. Written for every decision, human or automatic."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class EngineReplica(Base):
    """A vLLM replica as last observed by the reconciler."""

    __tablename__ = "engine_replicas"

    url: Mapped[str] = mapped_column(String(300), primary_key=True)
    healthy: Mapped[bool] = mapped_column(Boolean, default=False)
    loaded: Mapped[list[Any]] = mapped_column(JSONB, default=list)
    last_error: Mapped[str | None] = mapped_column(Text)
    checked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ExportStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    passed = "passed"  # written and within the policy's consistency tolerance
    failed = "failed"  # written, but outside the tolerance (numbers in metrics)
    error = "error"  # could not be built or checked (reason in failure_reason)
    deleted = "deleted"  # files removed by ops; the row stays for the audit trail


# An export in one of these states blocks a second identical request (same version/format/quant).
ACTIVE_EXPORT_STATES = (ExportStatus.queued, ExportStatus.running)


class Export(Base):
    """An edge export of one adapter version: a merged model or a GGUF, behind a consistency gate."""

    __tablename__ = "exports"
    __table_args__ = (
        Index("ix_exports_version", "version_id", "format", "quant"),
        Index("ix_exports_tenant_created", "tenant_id", "created_at"),
        # Two identical requests racing (API, CLI, a promotion) queue one job.
        Index(
            "uq_exports_one_active",
            "version_id", "format", text("coalesce(quant, '')"),
            unique=True,
            postgresql_where=text("status IN ('queued','running')"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=_uuid)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    adapter_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    version_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="CASCADE")
    )
    format: Mapped[str] = mapped_column(String(16))  # "merged" | "gguf"
    # What was asked for; the delivered quant may be less aggressive after a fallback.
    requested_quant: Mapped[str | None] = mapped_column(String(16))
    quant: Mapped[str | None] = mapped_column(String(16))
    fallback: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16), default=ExportStatus.queued.value)
    requested_by: Mapped[str] = mapped_column(String(200))
    # The delivered artifact: a directory (merged model, or model.gguf + Modelfile + lineage).
    path: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    # [{name, bytes, sha256}] of the delivered directory: downloads are served from this list only.
    files: Mapped[list[Any]] = mapped_column(JSONB, default=list)
    lineage: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    # Per attempt (merged gate, then each quantization tried): status, numbers, reasons.
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    suggestion: Mapped[str | None] = mapped_column(String(16))
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ImportStatus(str, enum.Enum):
    running = "running"
    done = "done"  # every record read: imported, skipped (counted by reason) or reported
    failed = "failed"  # stopped early (reason in failure_reason); what it committed stays


class FeedbackImport(Base):
    """One import of ratings collected elsewhere into an alias's feedback buffer."""

    __tablename__ = "feedback_imports"
    __table_args__ = (Index("ix_feedback_imports_adapter_created", "adapter_id", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=_uuid)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    adapter_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    source: Mapped[str] = mapped_column(String(16))  # "openwebui" | "langfuse" | "jsonl"
    status: Mapped[str] = mapped_column(String(16), default=ImportStatus.running.value)
    requested_by: Mapped[str] = mapped_column(String(200))
    file_name: Mapped[str | None] = mapped_column(Text)
    file_sha256: Mapped[str | None] = mapped_column(String(64))
    file_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # The rating rule it ran with (score name, thresholds).
    options: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    # Records in the file; each ends imported, skipped (reason counted) or an error (reported).
    total: Mapped[int] = mapped_column(Integer, default=0)
    imported: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    skipped_reasons: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    # The first malformed records: [{where, reason}] (where: "line 7", "item 3 (id ...)").
    error_samples: Mapped[list[Any]] = mapped_column(JSONB, default=list)
    # The run the import's ratings started, when they crossed the alias's trigger.
    run_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("training_runs.id", ondelete="SET NULL")
    )
    failure_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Moved on every committed batch: a running import whose heartbeat stops was interrupted.
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class JudgeSweep(Base):
    """One pass of the AI judge over an alias's unrated traffic (workers.judge)."""

    __tablename__ = "judge_sweeps"
    __table_args__ = (Index("ix_judge_sweeps_adapter_started", "adapter_id", "started_at"),)

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=_uuid)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    adapter_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(200))
    mode: Mapped[str] = mapped_column(String(16))
    # Interactions sent to the judge (what the hourly budget counts), failures included.
    attempted: Mapped[int] = mapped_column(Integer, default=0)
    rated: Mapped[int] = mapped_column(Integer, default=0)
    up: Mapped[int] = mapped_column(Integer, default=0)
    down: Mapped[int] = mapped_column(Integer, default=0)
    calibration: Mapped[int] = mapped_column(Integer, default=0)  # of rated: humans rated too
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    skipped_reasons: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    # Why the sweep stopped early (the judge unreachable, out of time); NULL when it finished.
    stopped: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
