"""The desired engine state, read from Postgres: which adapter versions every replica must hold.

A version must be loaded while its status is live, warm or staged, or while an alias serves it
or sends it canary traffic. Everything else the DB knows (candidate, retired, failed) must not be
loaded. Names the DB does not know are left alone: they belong to someone else.

How many of an alias's versions stay resident is bounded (residency.py): residents() lists
them with their roles, and the reconciler lets the ones past the bound go.

Pure query functions over a sync Session; nothing here writes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session

from service.db.models import Adapter, AdapterVersion, TrainingRun, VersionStatus
from service.engine.residency import (
    RUN_STATES_USING_CANDIDATE,
    BoundFor,
    Resident,
    beyond_bound,
    resident,
)

LOADED_STATUSES = (VersionStatus.live.value, VersionStatus.warm.value, VersionStatus.staged.value)


@dataclass(frozen=True)
class DesiredVersion:
    """A version every healthy replica must hold."""

    version_id: uuid.UUID
    adapter_id: uuid.UUID
    lora_name: str
    artifact_path: str
    status: str
    sha256: str = ""


@dataclass(frozen=True)
class KnownVersion:
    """A lora name the DB knows, with its owner and status."""

    version_id: uuid.UUID
    adapter_id: uuid.UUID
    status: str


def _must_load():
    return or_(AdapterVersion.status.in_(LOADED_STATUSES),
               Adapter.serving_version_id == AdapterVersion.id,
               Adapter.canary_version_id == AdapterVersion.id)


def desired_versions(session: Session, adapter_id: uuid.UUID | None = None) -> list[DesiredVersion]:
    """Versions that must be loaded everywhere, optionally for one adapter only."""
    q = (select(AdapterVersion.id, AdapterVersion.adapter_id, AdapterVersion.lora_name,
                AdapterVersion.artifact_path, AdapterVersion.status, AdapterVersion.sha256)
         .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
         .where(_must_load())
         .order_by(AdapterVersion.adapter_id, AdapterVersion.number))
    if adapter_id is not None:
        q = q.where(AdapterVersion.adapter_id == adapter_id)
    return [DesiredVersion(r.id, r.adapter_id, r.lora_name, r.artifact_path, r.status, r.sha256)
            for r in session.execute(q)]


def residents(session: Session, adapter_id: uuid.UUID | None = None,
              drain_s: float | None = None) -> list[Resident]:
    """Desired versions with their roles (residency.py), oldest first per adapter; with drain_s,
    warm versions of aliases that last changed longer ago than that may go."""
    in_run = set(session.scalars(select(TrainingRun.candidate_version_id).where(
        TrainingRun.state.in_(RUN_STATES_USING_CANDIDATE),
        TrainingRun.candidate_version_id.is_not(None))))
    q = version_rows().where(_must_load()).order_by(AdapterVersion.adapter_id,
                                                    AdapterVersion.number)
    if adapter_id is not None:
        q = q.where(AdapterVersion.adapter_id == adapter_id)
    if drain_s is None:
        return [resident(r, r.id in in_run) for r in session.execute(q)]
    q = q.add_columns((Adapter.updated_at < func.now() - timedelta(seconds=drain_s)).label("drained"))
    return [resident(r, r.id in in_run, bool(r.drained)) for r in session.execute(q)]


def beyond_bounds(session: Session, bound_for: BoundFor, adapter_id: uuid.UUID | None = None,
                  drain_s: float | None = None) -> list[Resident]:
    """Desired versions past their alias's residency bound (optionally one adapter's); warm ones
    only past drain_s when it is given."""
    by_adapter: dict[uuid.UUID, list[Resident]] = {}
    for r in residents(session, adapter_id, drain_s):
        by_adapter.setdefault(r.adapter_id, []).append(r)
    return [v for rs in by_adapter.values()
            for v in beyond_bound(rs, bound_for(rs[0].tenant_id, rs[0].alias))]


def version_rows() -> Select:
    """Versions with their alias's tenant, name and routing: the columns residency.resident()
    reads. Shared with the API's async reads (which versions a replica holds, for whom)."""
    return (select(AdapterVersion.id, AdapterVersion.adapter_id, AdapterVersion.lora_name,
                   AdapterVersion.number, AdapterVersion.status, Adapter.tenant_id, Adapter.alias,
                   Adapter.serving_version_id, Adapter.canary_version_id)
            .join(Adapter, Adapter.id == AdapterVersion.adapter_id))


def known_versions(session: Session, names: Iterable[str]) -> dict[str, KnownVersion]:
    """The subset of ``names`` that are lora names of versions in the DB."""
    names = sorted(set(names))
    if not names:
        return {}
    rows = session.execute(
        select(AdapterVersion.lora_name, AdapterVersion.id, AdapterVersion.adapter_id,
               AdapterVersion.status).where(AdapterVersion.lora_name.in_(names)))
    return {r.lora_name: KnownVersion(r.id, r.adapter_id, r.status) for r in rows}


def adapter_version_names(session: Session, adapter_id: uuid.UUID) -> set[str]:
    """Every lora name ever given to an adapter's versions."""
    return set(session.scalars(
        select(AdapterVersion.lora_name).where(AdapterVersion.adapter_id == adapter_id)))


def expired_warm(session: Session, *, warm_grace_s: float, drain_s: float,
                 adapter_id: uuid.UUID | None = None) -> list[DesiredVersion]:
    """Warm versions that may be retired now.

    The alias's previous version stays warm for ``warm_grace_s`` after the alias last changed
    (instant rollback); any other warm version only for ``drain_s`` (stale routes and in-flight
    requests). ``Adapter.updated_at`` is bumped on every flip, so it is never earlier than the
    moment such a version stopped being served: the test is conservative.
    """
    previous = AdapterVersion.id == Adapter.previous_version_id
    none = uuid.UUID(int=0)
    q = (select(AdapterVersion.id, AdapterVersion.adapter_id, AdapterVersion.lora_name,
                AdapterVersion.artifact_path, AdapterVersion.status, AdapterVersion.sha256)
         .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
         .where(AdapterVersion.status == VersionStatus.warm.value,
                # Never retire what an alias still routes to, whatever its status says.
                AdapterVersion.id != func.coalesce(Adapter.serving_version_id, none),
                AdapterVersion.id != func.coalesce(Adapter.canary_version_id, none),
                or_(and_(previous,
                         Adapter.updated_at < func.now() - timedelta(seconds=warm_grace_s)),
                    and_(AdapterVersion.id != func.coalesce(Adapter.previous_version_id, none),
                         Adapter.updated_at < func.now() - timedelta(seconds=drain_s)))))
    if adapter_id is not None:
        q = q.where(AdapterVersion.adapter_id == adapter_id)
    return [DesiredVersion(r.id, r.adapter_id, r.lora_name, r.artifact_path, r.status, r.sha256)
            for r in session.execute(q)]


def alias_demand(session: Session) -> tuple[int, int]:
    """(aliases that serve an adapter version, aliases with a canary version) across all tenants."""
    row = session.execute(select(
        func.count().filter(Adapter.serving_version_id.is_not(None)),
        func.count().filter(Adapter.canary_version_id.is_not(None)),
    )).one()
    return int(row[0]), int(row[1])
