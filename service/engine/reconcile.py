"""Converge the replicas to the desired state in Postgres, and keep the gateway's pool current.

reconcile_once() lists every replica (GET /v1/models), retires warm versions whose grace or drain
time is over, lets staged versions past their alias's residency bound go (residency.py), loads
desired versions a replica lacks (a restarted or newly discovered replica gets its adapters) and
unloads versions the DB says must not be loaded. Names unknown to the DB are left alone.
It acts on an alias only while holding that alias's lock (swap.py), re-reading the alias's
desired state under it, so it never races a swap, rollback or canary change: a busy alias is
skipped until the next round.

The API runs it in the background (watcher.py). Several processes reconciling at once is safe:
loads of a name already loaded and unloads of a name already gone are no-ops.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.models import Adapter, AdapterVersion, AuditEvent, EngineReplica, VersionStatus
from service.db.repositories import audit
from service.db.session import db_call
from service.engine import desired
from service.engine.alias_lock import try_lock
from service.engine.artifact import ArtifactRejected, verifier
from service.engine.replicas import ReplicaPool
from service.engine.residency import BoundFor, Resident, default_bound
from service.engine.vllm_admin import AlreadyLoaded, ReplicaError, VllmAdmin

log = logging.getLogger(__name__)

Verify = Callable[[str, str], "ArtifactRejected | None"]


@dataclass
class ReplicaState:
    """One replica as seen (and changed) by a round."""

    url: str
    healthy: bool
    loaded: set[str] | None  # None: unreachable, contents unknown
    error: str | None = None
    max_model_len: int | None = None  # the base model's context as the replica reports it
    loaded_now: list[str] = field(default_factory=list)
    unloaded_now: list[str] = field(default_factory=list)


@dataclass
class ReconcileReport:
    """What a round saw and did."""

    replicas: list[ReplicaState]
    retired: list[str] = field(default_factory=list)
    # Staged versions let go because their alias had more resident than its bound.
    evicted: list[str] = field(default_factory=list)
    busy: list[uuid.UUID] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # Desired versions whose artifact failed verification: lora name -> why. Never loaded on a
    # replica that lacks them; a replica that already holds one keeps the copy it verified.
    refused: dict[str, str] = field(default_factory=dict)
    # The same, for public eyes (/readyz): version id -> the rejection's code. Lora names and
    # reasons (paths) carry tenant and alias names; the audit event has them, tenant-scoped.
    refused_codes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def converged(self) -> bool:
        return not self.busy and not self.errors


async def observe(admins: Sequence[VllmAdmin]) -> list[ReplicaState]:
    """GET /v1/models on every replica at once; a failure marks that replica unhealthy."""
    listed = await asyncio.gather(*(a.list_models() for a in admins), return_exceptions=True)
    return [ReplicaState(a.base_url, False, None, str(got)) if isinstance(got, BaseException)
            else ReplicaState(a.base_url, True, {m.id for m in got if m.parent is not None},
                              max_model_len=next((m.max_model_len for m in got
                                                  if m.parent is None), None))
            for a, got in zip(admins, listed, strict=True)]


def apply_to_pool(pool: ReplicaPool, states: Sequence[ReplicaState]) -> None:
    """Route only to replicas that answered, and only for the models they hold."""
    for s in states:
        loaded = set(s.loaded) if s.loaded is not None else None
        pool.observe(s.url, healthy=s.healthy, loaded=loaded, max_model_len=s.max_model_len)


# --- DB steps ----------------------------------------------------------------------------------

def _adapters_needing_work(session: Session, states: Sequence[ReplicaState], warm_grace_s: float,
                           drain_s: float, bound_for: BoundFor) -> set[uuid.UUID]:
    """Adapters with something to load, unload or retire, from one unlocked look."""
    want = desired.desired_versions(session)
    want_names = {d.lora_name for d in want}
    up = [s.loaded for s in states if s.healthy and s.loaded is not None]  # what each holds
    loaded = {name for names in up for name in names}
    known = desired.known_versions(session, loaded)
    out = {k.adapter_id for n, k in known.items() if n not in want_names}
    out |= {d.adapter_id for d in want if any(d.lora_name not in names for names in up)}
    out |= {w.adapter_id for w in desired.expired_warm(session, warm_grace_s=warm_grace_s,
                                                       drain_s=drain_s)}
    out |= {v.adapter_id for v in desired.beyond_bounds(session, bound_for, drain_s=drain_s)}
    return out


@dataclass
class AliasPlan:
    """One alias's round, decided under its lock."""

    retired: list[str]
    evicted: list[str]
    want: list[desired.DesiredVersion]
    names: set[str]  # every lora name the alias ever had


def _retire_and_read(session: Session, adapter_id: uuid.UUID, warm_grace_s: float, drain_s: float,
                     bound_for: BoundFor = default_bound) -> AliasPlan:
    """Under the alias lock: retire expired warm versions, let versions past the residency
    bound go (staged back to candidate, drained warm ones retired), then read what must be
    loaded."""
    expired = desired.expired_warm(session, warm_grace_s=warm_grace_s, drain_s=drain_s,
                                   adapter_id=adapter_id)
    for w in expired:
        session.execute(update(AdapterVersion).where(AdapterVersion.id == w.version_id)
                        .values(status=VersionStatus.retired.value))
    if expired:
        _audit_retired(session, adapter_id, expired, warm_grace_s, drain_s)
    evicted = desired.beyond_bounds(session, bound_for, adapter_id, drain_s=drain_s)
    for v in evicted:
        session.execute(update(AdapterVersion).where(AdapterVersion.id == v.version_id)
                        .values(status=v.evicted_status))
    if evicted:
        _audit_evicted(session, evicted, bound_for)
    return AliasPlan([w.lora_name for w in expired], [v.lora_name for v in evicted],
                     desired.desired_versions(session, adapter_id),
                     desired.adapter_version_names(session, adapter_id))


def _audit_evicted(session: Session, evicted: list[Resident], bound_for: BoundFor) -> None:
    for v in evicted:
        bound = bound_for(v.tenant_id, v.alias)
        audit(session, tenant_id=v.tenant_id, actor="reconciler", action="adapter.evict",
              target_type="adapter_version", target_id=str(v.version_id),
              reason=f"residency bound: {v.alias} keeps at most {bound} versions loaded "
                     "(serving.max_resident_versions)",
              detail={"lora_name": v.lora_name, "alias": v.alias, "from": v.status,
                      "to": v.evicted_status, "max_resident_versions": bound})


def _audit_retired(session: Session, adapter_id: uuid.UUID, expired: list[desired.DesiredVersion],
                   warm_grace_s: float, drain_s: float) -> None:
    adapter = session.get(Adapter, adapter_id)
    for w in expired:
        audit(session, tenant_id=adapter.tenant_id if adapter else None, actor="reconciler",
              action="adapter.retire", target_type="adapter_version", target_id=str(w.version_id),
              reason="warm period over",
              detail={"lora_name": w.lora_name, "warm_grace_s": warm_grace_s, "drain_s": drain_s})


def _record(session: Session, states: Sequence[ReplicaState]) -> None:
    for s in states:
        values = {"url": s.url, "healthy": s.healthy, "last_error": s.error,
                  "checked_at": func.now()}
        if s.loaded is not None:
            values["loaded"] = sorted(s.loaded)
        stmt = pg_insert(EngineReplica).values(**values)
        session.execute(stmt.on_conflict_do_update(
            index_elements=[EngineReplica.url],
            set_={k: stmt.excluded[k] for k in values if k != "url"}))


def forget_replicas(session: Session, urls: Sequence[str]) -> None:
    """Drop the rows of replicas that are gone (discovery no longer finds them)."""
    session.execute(delete(EngineReplica).where(EngineReplica.url.in_(list(urls))))


# --- replica steps -----------------------------------------------------------------------------

async def _converge_replica(admin: VllmAdmin, state: ReplicaState,
                            want: list[desired.DesiredVersion], names: set[str],
                            errors: list[str], refused: dict[str, str]) -> None:
    assert state.loaded is not None
    want_names = {d.lora_name for d in want}
    for d in want:
        if d.lora_name in state.loaded or d.lora_name in refused:
            continue
        try:
            await admin.load_lora(d.lora_name, d.artifact_path)
            state.loaded_now.append(d.lora_name)
        except AlreadyLoaded:
            pass  # loaded since we looked (a swap): same name, same artifact
        except ReplicaError as e:
            errors.append(str(e))
            continue
        state.loaded.add(d.lora_name)
    for name in sorted((state.loaded & names) - want_names):
        try:
            if await admin.unload_lora(name):
                state.unloaded_now.append(name)
        except ReplicaError as e:
            errors.append(str(e))
            continue
        state.loaded.discard(name)


async def _verify_missing(sessions: sessionmaker, verify: Verify, want: list[desired.DesiredVersion],
                          up: Sequence[ReplicaState], report: ReconcileReport) -> None:
    """Verify (sha256, no pickles, loadable) every version some healthy replica is about to
    load; a refusal is logged, audited once per version and reason, and kept in the report."""
    for d in want:
        if all(d.lora_name in (s.loaded or ()) for s in up):
            continue
        rejected = await asyncio.to_thread(verify, d.artifact_path, d.sha256)
        if rejected is None:
            continue
        report.refused[d.lora_name] = rejected.reason
        report.refused_codes[str(d.version_id)] = rejected.code
        log.error("reconcile: refusing to load %s: %s", d.lora_name, rejected.reason)
        await db_call(sessions, _audit_refused, d, rejected)


def _audit_refused(session: Session, d: desired.DesiredVersion, rejected: ArtifactRejected) -> None:
    seen = session.scalar(select(func.count()).select_from(AuditEvent).where(
        AuditEvent.action == "artifact.refused", AuditEvent.target_id == str(d.version_id),
        AuditEvent.reason == rejected.reason))
    if seen:
        return
    adapter = session.get(Adapter, d.adapter_id)
    audit(session, tenant_id=adapter.tenant_id if adapter else None, actor="reconciler",
          action="artifact.refused", target_type="adapter_version", target_id=str(d.version_id),
          reason=rejected.reason, detail={"lora_name": d.lora_name, "code": rejected.code,
                                          "artifact_path": d.artifact_path})


async def reconcile_once(sessions: sessionmaker, admins: Sequence[VllmAdmin], *,
                         warm_grace_s: float, drain_s: float, verify: Verify,
                         pool: ReplicaPool | None = None,
                         bound_for: BoundFor = default_bound) -> ReconcileReport:
    """One round: observe, retire expired warm versions and staged ones past the alias's
    residency bound (`bound_for(tenant, alias)`), load what is missing (each artifact verified
    first: `verify(path, sha256)` from service.engine.artifact.verifier), unload the rest."""
    t0 = time.perf_counter()
    states = await observe(admins)
    report = ReconcileReport(replicas=states)
    todo = await db_call(sessions, _adapters_needing_work, states, warm_grace_s, drain_s,
                         bound_for)
    by_url = {a.base_url: a for a in admins}
    up = [s for s in states if s.healthy]
    for adapter_id in sorted(todo):
        lock = await try_lock(sessions, adapter_id)
        if lock is None:
            report.busy.append(adapter_id)  # an operation holds it and converges it itself
            continue
        try:
            plan = await db_call(sessions, _retire_and_read, adapter_id, warm_grace_s, drain_s,
                                 bound_for)
            report.retired += plan.retired
            report.evicted += plan.evicted
            await _verify_missing(sessions, verify, plan.want, up, report)
            await asyncio.gather(*(_converge_replica(by_url[s.url], s, plan.want, plan.names,
                                                     report.errors, report.refused)
                                   for s in up))
        finally:
            await asyncio.shield(asyncio.to_thread(lock.release))
    await db_call(sessions, _record, states)
    if pool is not None:
        apply_to_pool(pool, states)
        pool.refused = dict(report.refused_codes)
    report.seconds = time.perf_counter() - t0
    return report


def settings_verifier(settings: Settings) -> Verify:
    """The artifact check of this deployment's engine (its base model and LoRA rank)."""
    return verifier(engine_base_model=settings.resolved_base_model,
                    max_lora_rank=settings.vllm_max_lora_rank)
