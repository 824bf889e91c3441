"""The DB steps of engine operations: reads, flips and status marks, each one short transaction
(run through service.db.session.db_call, under the alias lock)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.db.models import Adapter, AdapterVersion, VersionStatus
from service.db.repositories import RowMissing, audit
from service.engine import desired, sizing
from service.engine.errors import SwapRefused


@dataclass(frozen=True)
class Version:
    id: uuid.UUID
    adapter_id: uuid.UUID
    tenant_id: str
    alias: str
    lora_name: str
    artifact_path: str
    sha256: str
    status: str


@dataclass(frozen=True)
class Alias:
    id: uuid.UUID
    tenant_id: str
    alias: str
    serving_version_id: uuid.UUID | None
    previous_version_id: uuid.UUID | None
    canary_version_id: uuid.UUID | None


def read_version(session: Session, version_id: uuid.UUID) -> Version:
    row = session.execute(
        select(AdapterVersion, Adapter.tenant_id, Adapter.alias)
        .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
        .where(AdapterVersion.id == version_id)).first()
    if row is None:
        raise SwapRefused(f"no adapter version {version_id}", "not_found")
    v = row[0]
    return Version(v.id, v.adapter_id, row.tenant_id, row.alias, v.lora_name, v.artifact_path,
                    v.sha256, v.status)


def read_alias(session: Session, adapter_id: uuid.UUID) -> Alias:
    a = session.get(Adapter, adapter_id)
    if a is None:
        raise SwapRefused(f"no adapter {adapter_id}", "not_found")
    return Alias(a.id, a.tenant_id, a.alias, a.serving_version_id, a.previous_version_id,
                  a.canary_version_id)


def check_size(session: Session, size: sizing.EngineSize | None, *, new_aliases: int = 0,
                new_canaries: int = 0) -> None:
    if size is None:
        return
    aliases, canaries = desired.alias_demand(session)
    try:
        sizing.check(size, sizing.Demand(aliases + new_aliases, canaries + new_canaries))
    except sizing.EngineTooSmall as e:
        raise SwapRefused(str(e), "engine_too_small") from e


def mark_failed(session: Session, v: Version, *, action: str, actor: str, code: str,
                 reason: str, phase: str) -> None:
    session.execute(update(AdapterVersion).where(AdapterVersion.id == v.id)
                    .values(status=VersionStatus.failed.value, failure_reason=f"{code}: {reason}"))
    # A failed canary gets no more traffic.
    session.execute(update(Adapter).where(Adapter.canary_version_id == v.id)
                    .values(canary_version_id=None, canary_share=0.0))
    audit(session, tenant_id=v.tenant_id, actor=actor, action=f"adapter.{action}_failed",
          target_type="adapter_version", target_id=str(v.id), reason=f"{code}: {reason}",
          detail={"alias": v.alias, "lora_name": v.lora_name, "phase": phase})


def set_status(session: Session, version_id: uuid.UUID | None, status: str, **values: Any) -> None:
    if version_id is not None:
        session.execute(update(AdapterVersion).where(AdapterVersion.id == version_id)
                        .values(status=status, **values))


def retire_drained(session: Session, adapter: Adapter, keep: set[uuid.UUID | None],
                    last_change: Any, now: Any, drain_s: float) -> list[str]:
    """Retire the alias's other warm versions when nothing can have routed to them for drain_s."""
    if last_change is None or (now - last_change).total_seconds() < drain_s:
        return []  # a stale route may still name them: the reconciler retires them later
    rows = session.execute(
        select(AdapterVersion.id, AdapterVersion.lora_name)
        .where(AdapterVersion.adapter_id == adapter.id,
               AdapterVersion.status == VersionStatus.warm.value,
               AdapterVersion.id.not_in([k for k in keep if k is not None]))).all()
    for r in rows:
        set_status(session, r.id, VersionStatus.retired.value)
    return [r.lora_name for r in rows]


def lock_adapter(session: Session, adapter_id: uuid.UUID) -> Adapter:
    # FOR NO KEY UPDATE: the gateway's interaction inserts take KEY SHARE on this row (foreign
    # key); FOR UPDATE would queue the flip behind them under traffic.
    adapter = session.get(Adapter, adapter_id, with_for_update={"key_share": True})
    if adapter is None:
        raise RowMissing(f"no adapters row with id {adapter_id}")
    return adapter


def flip_swap(session: Session, v: Version, *, actor: str, reason: str | None, drain_s: float,
               detail: dict) -> tuple[uuid.UUID | None, list[str]]:
    """Make v the alias's serving version; returns (previous version, names to unload)."""
    adapter = lock_adapter(session, v.adapter_id)
    now = session.execute(select(func.now())).scalar_one()
    old, last_change = adapter.serving_version_id, adapter.updated_at
    if old is not None:
        set_status(session, old, VersionStatus.warm.value)
        adapter.previous_version_id = old
    adapter.serving_version_id = v.id
    if adapter.canary_version_id == v.id:  # a promoted canary stops being one
        adapter.canary_version_id, adapter.canary_share = None, 0.0
    set_status(session, v.id, VersionStatus.live.value, promoted_at=now, failure_reason=None)
    retire = retire_drained(session, adapter, {old, v.id, adapter.canary_version_id},
                             last_change, now, drain_s)
    adapter.updated_at = now
    audit(session, tenant_id=v.tenant_id, actor=actor, action="adapter.swap", target_type="adapter",
          target_id=str(adapter.id), reason=reason,
          detail={**detail, "alias": v.alias, "from": str(old) if old else None, "to": str(v.id),
                  "lora_name": v.lora_name, "retired": retire})
    return old, retire


def flip_rollback(session: Session, a: Alias, target: Version | None, *, actor: str,
                   reason: str | None, detail: dict) -> None:
    adapter = lock_adapter(session, a.id)
    now = session.execute(select(func.now())).scalar_one()
    bad = adapter.serving_version_id
    # The rolled-back version stays loaded through drain_s so stale routes still find it.
    set_status(session, bad, VersionStatus.warm.value,
                failure_reason=f"rolled back: {reason or 'no reason given'}")
    if target is not None:
        set_status(session, target.id, VersionStatus.live.value, promoted_at=now,
                    failure_reason=None)
    adapter.serving_version_id = target.id if target else None
    adapter.previous_version_id = None
    adapter.updated_at = now
    audit(session, tenant_id=a.tenant_id, actor=actor, action="adapter.rollback",
          target_type="adapter", target_id=str(a.id), reason=reason,
          detail={**detail, "alias": a.alias, "from": str(bad) if bad else None,
                  "to": str(target.id) if target else None})


def flip_canary(session: Session, a: Alias, v: Version | None, share: float, *, actor: str,
                 reason: str | None, detail: dict) -> None:
    adapter = lock_adapter(session, a.id)
    now = session.execute(select(func.now())).scalar_one()
    old = adapter.canary_version_id
    if old is not None and (v is None or old != v.id):
        set_status(session, old, VersionStatus.warm.value)  # drained, then retired
    if v is not None:
        set_status(session, v.id, VersionStatus.staged.value, failure_reason=None)
    adapter.canary_version_id = v.id if v else None
    adapter.canary_share = share if v else 0.0
    adapter.updated_at = now
    audit(session, tenant_id=a.tenant_id, actor=actor, action="adapter.canary",
          target_type="adapter", target_id=str(a.id), reason=reason,
          detail={**detail, "alias": a.alias, "from": str(old) if old else None,
                  "to": str(v.id) if v else None, "share": share if v else 0.0})


def mark_staged(session: Session, v: Version, *, actor: str, reason: str | None,
                 detail: dict) -> None:
    set_status(session, v.id, VersionStatus.staged.value, failure_reason=None)
    audit(session, tenant_id=v.tenant_id, actor=actor, action="adapter.stage",
          target_type="adapter_version", target_id=str(v.id), reason=reason,
          detail={**detail, "alias": v.alias, "lora_name": v.lora_name})
