"""Queries the API and CLI need, as plain functions over a session. One statement per hot path."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from service.db.models import (
    Adapter,
    AdapterVersion,
    ApiKey,
    AuditEvent,
    Base,
    Feedback,
    Interaction,
    Tenant,
)
from service.names import check_name

RowT = TypeVar("RowT", bound=Base)


@dataclass(frozen=True)
class Principal:
    """Who is calling: resolved from an API key."""

    key_id: uuid.UUID
    tenant_id: str
    role: str


@dataclass(frozen=True)
class Route:
    """What an alias serves right now."""

    alias: str
    adapter_id: uuid.UUID | None
    version_id: uuid.UUID | None
    served_model: str  # lora name, or the base model's served name
    canary_version_id: uuid.UUID | None = None
    canary_model: str | None = None
    canary_share: float = 0.0


class RowMissing(LookupError):
    """A row that a foreign key, a claim or an earlier step names is not there (deleted since)."""


def get_row(session: Session, model: type[RowT], key: Any) -> RowT:
    """session.get for a row that must exist: RowMissing, naming the table and key, if not."""
    row = session.get(model, key)
    if row is None:
        raise RowMissing(f"no {model.__tablename__} row with id {key}")
    return row


# --- keys (sync: CLI) -------------------------------------------------------------------------

def ensure_tenant(session: Session, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        check_name("tenant id", tenant_id)
        tenant = Tenant(id=tenant_id, name=tenant_id)
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(session: Session, *, tenant_id: str, role: str, key_hash: str, prefix: str,
                   name: str = "") -> ApiKey:
    ensure_tenant(session, tenant_id)
    key = ApiKey(tenant_id=tenant_id, role=role, key_hash=key_hash, prefix=prefix, name=name)
    session.add(key)
    session.flush()
    return key


def list_api_keys(session: Session, tenant_id: str | None = None) -> list[ApiKey]:
    q = select(ApiKey).order_by(ApiKey.created_at)
    if tenant_id:
        q = q.where(ApiKey.tenant_id == tenant_id)
    return list(session.scalars(q))


def revoke_api_key(session: Session, key_id_or_prefix: str) -> ApiKey | None:
    """Revoke by id or by display prefix; returns the key, or None if nothing matched."""
    try:
        key = session.get(ApiKey, uuid.UUID(key_id_or_prefix))
    except ValueError:
        key = session.scalars(select(ApiKey).where(ApiKey.prefix == key_id_or_prefix)).first()
    if key is not None and key.revoked_at is None:
        key.revoked_at = datetime.now().astimezone()
    return key


def ensure_adapter(session: Session, tenant_id: str, alias: str, description: str = "") -> Adapter:
    ensure_tenant(session, tenant_id)
    adapter = session.scalars(
        select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.alias == alias)
    ).first()
    if adapter is None:
        check_name("alias", alias)
        adapter = Adapter(tenant_id=tenant_id, alias=alias, description=description)
        session.add(adapter)
        session.flush()
    return adapter


def adapters_named(session: Session, alias: str, tenant_id: str | None = None) -> list[Adapter]:
    """The adapters with this alias: the tenant's one, or every tenant's when tenant_id is None."""
    q = select(Adapter).where(Adapter.alias == alias)
    if tenant_id is not None:
        q = q.where(Adapter.tenant_id == tenant_id)
    return list(session.scalars(q).all())


def audit(session: Session, *, tenant_id: str | None, actor: str, action: str, target_type: str,
          target_id: str, reason: str | None = None, detail: dict | None = None) -> None:
    session.add(AuditEvent(tenant_id=tenant_id, actor=actor, action=action, target_type=target_type,
                           target_id=target_id, reason=reason, detail=detail or {}))


# --- API (async) -------------------------------------------------------------------------------

async def principal_for_hash(session: AsyncSession, key_hash: str) -> Principal | None:
    row = (await session.execute(
        select(ApiKey.id, ApiKey.tenant_id, ApiKey.role)
        .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    )).first()
    return Principal(key_id=row.id, tenant_id=row.tenant_id, role=row.role) if row else None


async def route_for_alias(session: AsyncSession, tenant_id: str, alias: str,
                          base_name: str) -> Route | None:
    """The route for an alias of a tenant; the base model name routes to base. None: unknown."""
    if alias == base_name:
        return Route(alias=alias, adapter_id=None, version_id=None, served_model=base_name)
    serving = AdapterVersion.__table__.alias("serving")
    canary = AdapterVersion.__table__.alias("canary")
    row = (await session.execute(
        select(Adapter.id, Adapter.serving_version_id, Adapter.canary_version_id,
               Adapter.canary_share, serving.c.lora_name.label("serving_name"),
               canary.c.lora_name.label("canary_name"))
        .select_from(Adapter)
        .outerjoin(serving, serving.c.id == Adapter.serving_version_id)
        .outerjoin(canary, canary.c.id == Adapter.canary_version_id)
        .where(Adapter.tenant_id == tenant_id, Adapter.alias == alias)
    )).first()
    if row is None:
        return None
    return Route(
        alias=alias, adapter_id=row.id, version_id=row.serving_version_id,
        served_model=row.serving_name or base_name,
        canary_version_id=row.canary_version_id, canary_model=row.canary_name,
        canary_share=float(row.canary_share or 0.0) if row.canary_name else 0.0,
    )


async def list_routes(session: AsyncSession, tenant_id: str) -> list[tuple[str, datetime]]:
    rows = await session.execute(
        select(Adapter.alias, Adapter.created_at).where(Adapter.tenant_id == tenant_id)
        .order_by(Adapter.alias)
    )
    return [(r.alias, r.created_at) for r in rows]


async def get_interaction(session: AsyncSession, interaction_id: uuid.UUID, tenant_id: str,
                          owner_key: uuid.UUID | None) -> tuple[Interaction, list[Feedback]] | None:
    q = select(Interaction).where(Interaction.id == interaction_id,
                                  Interaction.tenant_id == tenant_id)
    if owner_key is not None:
        q = q.where(Interaction.api_key_id == owner_key)
    interaction = (await session.scalars(q)).first()
    if interaction is None:
        return None
    feedback = list(await session.scalars(
        select(Feedback).where(Feedback.interaction_id == interaction_id).order_by(Feedback.created_at)
    ))
    return interaction, feedback


# --- adapter versions (sync: workers) ----------------------------------------------------------

def lora_name_for(tenant_id: str, alias: str, number: int) -> str:
    """The engine name of a version; unique and never reused (vllm #42125)."""
    return f"{tenant_id}--{alias}--v{number}"


def create_version(session: Session, adapter: Adapter, *, artifact_path: str, sha256: str,
                   parent_version_id: uuid.UUID | None, run_id: uuid.UUID | None,
                   lineage: dict) -> AdapterVersion:
    """A new candidate version numbered after the adapter's highest (row-locked, so no two share one)."""
    session.execute(select(Adapter.id).where(Adapter.id == adapter.id).with_for_update())
    highest = session.scalar(
        select(AdapterVersion.number).where(AdapterVersion.adapter_id == adapter.id)
        .order_by(AdapterVersion.number.desc()).limit(1)
    ) or 0
    number = highest + 1
    version = AdapterVersion(
        adapter_id=adapter.id, number=number,
        lora_name=lora_name_for(adapter.tenant_id, adapter.alias, number),
        artifact_path=artifact_path, sha256=sha256, parent_version_id=parent_version_id,
        run_id=run_id, lineage=lineage,
    )
    session.add(version)
    session.flush()
    return version
