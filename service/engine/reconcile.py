"""Converge the replicas to the desired state in Postgres, and keep the gateway's pool current.

reconcile_once() lists every replica (GET /v1/models), retires warm versions whose grace or drain
time is over, loads desired versions a replica lacks (a restarted replica gets its adapters back)
and unloads versions the DB says must not be loaded. Names unknown to the DB are left alone.
It acts on an alias only while holding that alias's lock (swap.py), re-reading the alias's
desired state under it, so it never races a swap, rollback or canary change: a busy alias is
skipped until the next round.

EngineWatcher runs in every API process: an observer that feeds GET /v1/models into the
ReplicaPool every ``replica_observe_interval_s`` (a replica that does not answer is out of
routing until it does; a version is routed only to replicas that hold it), and the reconciler
every ``reconcile_interval_s``. Several processes reconciling at once is safe: loads of a name
already loaded and unloads of a name already gone are no-ops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.models import Adapter, AdapterVersion, AuditEvent, EngineReplica, VersionStatus
from service.db.repositories import audit
from service.db.session import db_call, make_sync_engine
from service.engine import desired, sizing
from service.engine.alias_lock import try_lock
from service.engine.artifact import ArtifactRejected, verifier
from service.engine.replicas import ReplicaPool
from service.engine.vllm_admin import AlreadyLoaded, ReplicaError, VllmAdmin

log = logging.getLogger(__name__)

Verify = Callable[[str, str], "ArtifactRejected | None"]

# Observing must not stall on a hung replica; loads may legitimately take longer.
OBSERVE_TIMEOUT_S = 3.0
CONTROL_TIMEOUT_S = 60.0


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
                           drain_s: float) -> set[uuid.UUID]:
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
    return out


def _retire_and_read(session: Session, adapter_id: uuid.UUID, warm_grace_s: float, drain_s: float
                     ) -> tuple[list[str], list[desired.DesiredVersion], set[str]]:
    """Under the alias lock: retire expired warm versions, then read what must be loaded."""
    expired = desired.expired_warm(session, warm_grace_s=warm_grace_s, drain_s=drain_s,
                                   adapter_id=adapter_id)
    for w in expired:
        session.execute(update(AdapterVersion).where(AdapterVersion.id == w.version_id)
                        .values(status=VersionStatus.retired.value))
    if expired:
        _audit_retired(session, adapter_id, expired, warm_grace_s, drain_s)
    return ([w.lora_name for w in expired], desired.desired_versions(session, adapter_id),
            desired.adapter_version_names(session, adapter_id))


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
                         pool: ReplicaPool | None = None) -> ReconcileReport:
    """One round: observe, retire expired warm versions, load what is missing (each artifact
    verified first: `verify(path, sha256)` from service.engine.artifact.verifier), unload the
    rest."""
    t0 = time.perf_counter()
    states = await observe(admins)
    report = ReconcileReport(replicas=states)
    todo = await db_call(sessions, _adapters_needing_work, states, warm_grace_s, drain_s)
    by_url = {a.base_url: a for a in admins}
    up = [s for s in states if s.healthy]
    for adapter_id in sorted(todo):
        lock = await try_lock(sessions, adapter_id)
        if lock is None:
            report.busy.append(adapter_id)  # an operation holds it and converges it itself
            continue
        try:
            retired, want, names = await db_call(sessions, _retire_and_read, adapter_id,
                                             warm_grace_s, drain_s)
            report.retired += retired
            await _verify_missing(sessions, verify, want, up, report)
            await asyncio.gather(*(_converge_replica(by_url[s.url], s, want, names, report.errors,
                                                     report.refused)
                                   for s in up))
        finally:
            await asyncio.shield(asyncio.to_thread(lock.release))
    await db_call(sessions, _record, states)
    if pool is not None:
        apply_to_pool(pool, states)
        pool.refused = dict(report.refused_codes)
    report.seconds = time.perf_counter() - t0
    return report


# --- the API's background task -----------------------------------------------------------------

class EngineWatcher:
    """Observer + reconciler loops for one API process; start() then aclose() at shutdown."""

    def __init__(self, pool: ReplicaPool, sessions: sessionmaker, urls: Sequence[str], *,
                 observe_interval_s: float, reconcile_interval_s: float, warm_grace_s: float,
                 drain_s: float, verify: Verify, connect_timeout_s: float = 2.0) -> None:
        self.pool = pool
        self.verify = verify
        self.sessions = sessions
        self.observe_interval_s = observe_interval_s
        self.reconcile_interval_s = reconcile_interval_s
        self.warm_grace_s = warm_grace_s
        self.drain_s = drain_s
        self._observers = [VllmAdmin(u, timeout_s=OBSERVE_TIMEOUT_S,
                                     connect_timeout_s=connect_timeout_s, get_retries=0)
                           for u in urls]
        self._controls = [VllmAdmin(u, timeout_s=CONTROL_TIMEOUT_S,
                                    connect_timeout_s=connect_timeout_s) for u in urls]
        self._tasks: list[asyncio.Task] = []
        self.last_report: ReconcileReport | None = None

    async def start(self, settings: Settings | None = None) -> None:
        """Check the engine's sizing (when given settings), then start the loops.

        Raises EngineTooSmall when FLYWHEEL_ENGINE_SIZING_CHECK=error and the engine is too small.
        """
        if settings is not None:
            warning = await asyncio.to_thread(check_sizing, self.sessions, settings)
            if warning:
                log.warning("%s", warning)
        if not self._observers:
            return
        self._tasks.append(asyncio.create_task(self._observe_loop(), name="replica-observer"))
        if self.reconcile_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="reconciler"))

    async def aclose(self) -> None:
        """Cancel the loops and close clients and the DB engine."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for a in self._observers + self._controls:
            await a.aclose()
        self.sessions.kw["bind"].dispose()

    async def _observe_loop(self) -> None:
        while True:
            try:
                apply_to_pool(self.pool, await observe(self._observers))
            except Exception:  # noqa: BLE001 - the loop must outlive any one failure
                log.exception("replica observation failed")
            await asyncio.sleep(self.observe_interval_s)

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                self.last_report = await reconcile_once(
                    self.sessions, self._controls, warm_grace_s=self.warm_grace_s,
                    drain_s=self.drain_s, verify=self.verify, pool=self.pool)
                for e in self.last_report.errors:
                    log.warning("reconcile: %s", e)
            except Exception as exc:  # noqa: BLE001 - e.g. the database is down: try next round
                log.warning("reconcile round failed: %s", exc)
            await asyncio.sleep(self.reconcile_interval_s)


def watcher_from_settings(settings: Settings, db_url: str, pool: ReplicaPool) -> EngineWatcher:
    """An EngineWatcher for this process's replicas, with its own small sync DB pool."""
    engine = make_sync_engine(db_url, connect_timeout_s=settings.db_connect_timeout_s, pool_size=2)
    return EngineWatcher(pool, sessionmaker(engine, expire_on_commit=False), settings.vllm_url_list,
                         observe_interval_s=settings.replica_observe_interval_s,
                         reconcile_interval_s=settings.reconcile_interval_s,
                         warm_grace_s=settings.warm_grace_s, drain_s=settings.drain_s,
                         verify=settings_verifier(settings),
                         connect_timeout_s=settings.upstream_connect_timeout_s)


def settings_verifier(settings: Settings) -> Verify:
    """The artifact check of this deployment's engine (its base model and LoRA rank)."""
    return verifier(engine_base_model=settings.resolved_base_model,
                    max_lora_rank=settings.vllm_max_lora_rank)


def check_sizing(sessions: sessionmaker, settings: Settings) -> str | None:
    """The start-time sizing check: raises EngineTooSmall (mode "error") or returns a warning."""
    if settings.engine_sizing_check == "off":
        return None
    size = sizing.EngineSize(settings.vllm_max_loras, settings.vllm_max_cpu_loras)
    try:
        with sessions() as session:
            sizing.check_db(session, size)
    except sizing.EngineTooSmall as e:
        if settings.engine_sizing_check == "error":
            log.error("%s", e)
            raise
        return str(e)
    except SQLAlchemyError as e:
        # The API starts while Postgres is down; the swap re-checks before giving an alias its
        # first adapter.
        return f"engine sizing not checked: database unavailable ({type(e).__name__})"
    return None
