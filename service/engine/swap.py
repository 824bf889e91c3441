"""Hot-swap adapter versions into the running vLLM replicas, one operation at a time per alias.

swap(): 1. verify the artifact; 2. load it on every healthy replica; 3. smoke-generate on each;
4. flip the alias's serving version in one transaction; 5. keep the previous version warm (the
reconciler retires it after ``warm_grace_s``) and unload older warm versions once no stale route
can reach them (``drain_s``). A failure before the flip unloads the candidate wherever it may have
landed, leaves the alias as it was and marks the version failed with the reason.

Names are never reused (repositories.lora_name_for), so a name already loaded on a replica is the
same artifact: AlreadyLoaded counts as loaded. Gateways follow a flip within
``routing_cache_ttl_s``; the old version stays loaded past that, so no request meets a 404.

Every operation holds the alias's Postgres advisory lock on a dedicated connection (a crashed
holder's lock dies with its connection); the reconciler takes the same lock before touching an
alias's versions. Expected failures come back as a SwapResult with ok=False; refusals that touch
nothing raise SwapRefused / SwapInProgress.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from sqlalchemy import func, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.models import Adapter, AdapterVersion, VersionStatus
from service.db.repositories import audit
from service.db.session import session_scope
from service.engine import desired, sizing
from service.engine.artifact import ArtifactRejected, verify_artifact
from service.engine.vllm_admin import AlreadyLoaded, ReplicaError, VllmAdmin

T = TypeVar("T")

# Advisory-lock namespace ("FWSW"); the second key is derived from the adapter id.
LOCK_NAMESPACE = 0x46575357
# Versions a swap, stage or canary may load: never one that is or was serving (use rollback).
LOADABLE = (VersionStatus.candidate.value, VersionStatus.staged.value, VersionStatus.failed.value)


class SwapError(Exception):
    """An operation was refused before it changed anything; ``code`` is a short machine string."""

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.reason = reason
        self.code = code


class SwapInProgress(SwapError):
    """Another swap, rollback or reconcile holds the alias."""


class SwapRefused(SwapError):
    """The request cannot be carried out as asked (unknown version, wrong state, no replica...)."""


@dataclass(frozen=True)
class SwapConfig:
    """What a swap checks artifacts against and how long it keeps versions around."""

    engine_base_model: str
    max_lora_rank: int
    # None skips the sizing check (the caller does not know the engine's flags).
    engine_size: sizing.EngineSize | None = None
    drain_s: float = 30.0
    lock_wait_s: float = 10.0
    smoke_prompt: str = "Hello"
    smoke_max_tokens: int = 2

    @classmethod
    def from_settings(cls, settings: Settings) -> SwapConfig:
        """The config of this deployment; the base model must be configured."""
        if not settings.base_model:
            raise ValueError("FLYWHEEL_BASE_MODEL must name the engine's base model to verify "
                             "adapters against")
        if settings.drain_s <= settings.routing_cache_ttl_s:
            raise ValueError(f"FLYWHEEL_DRAIN_S ({settings.drain_s}) must exceed "
                             f"FLYWHEEL_ROUTING_CACHE_TTL_S ({settings.routing_cache_ttl_s})")
        return cls(engine_base_model=settings.base_model,
                   max_lora_rank=settings.vllm_max_lora_rank,
                   engine_size=sizing.EngineSize(settings.vllm_max_loras,
                                                 settings.vllm_max_cpu_loras),
                   drain_s=settings.drain_s, lock_wait_s=settings.swap_lock_wait_s)


@dataclass
class CallTiming:
    """One vLLM call made by an operation."""

    url: str
    op: str
    seconds: float
    ok: bool


@dataclass
class SwapResult:
    """What an operation did, how long each phase took, and why it failed if it did."""

    action: str
    adapter_id: uuid.UUID
    tenant_id: str
    alias: str
    version_id: uuid.UUID | None
    lora_name: str | None
    ok: bool = False
    code: str | None = None
    reason: str | None = None
    phase: str | None = None
    previous_version_id: uuid.UUID | None = None
    replicas: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    loaded_on: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    calls: list[CallTiming] = field(default_factory=list)
    # time.time() just after the flip committed; gateways follow within routing_cache_ttl_s.
    flipped_at: float | None = None

    @property
    def raw_calls_s(self) -> float:
        """Sum of the vLLM load and smoke call durations (what the swap cannot avoid)."""
        return sum(c.seconds for c in self.calls if c.op in ("load", "smoke"))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["raw_calls_s"] = self.raw_calls_s
        return {k: str(v) if isinstance(v, uuid.UUID) else v for k, v in out.items()}

    def _fail(self, phase: str, code: str, reason: str) -> SwapResult:
        self.ok, self.phase, self.code, self.reason = False, phase, code, reason
        return self


# --- the per-alias lock ------------------------------------------------------------------------

def lock_key(adapter_id: uuid.UUID) -> int:
    """The int4 half of an adapter's advisory-lock key."""
    return int.from_bytes(adapter_id.bytes[:4], "big", signed=True)


class AliasLock:
    """A session-level advisory lock on one adapter, on its own autocommit connection."""

    def __init__(self, engine: Engine, adapter_id: uuid.UUID) -> None:
        self._engine = engine
        self._key = lock_key(adapter_id)
        self._conn: Connection | None = None
        self._held = False
        # A cancelled await can leave a thread still using the connection.
        self._mutex = threading.Lock()

    def try_acquire(self) -> bool:
        """Take the lock if free (blocking DB call: run it in a thread)."""
        with self._mutex:
            if self._conn is None:
                self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._held = bool(self._conn.execute(
                text("SELECT pg_try_advisory_lock(CAST(:ns AS integer), CAST(:key AS integer))"),
                {"ns": LOCK_NAMESPACE, "key": self._key}).scalar())
            return self._held

    def release(self) -> None:
        """Unlock and give the connection back; a failed unlock drops the connection instead."""
        with self._mutex:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                if self._held:
                    conn.execute(text("SELECT pg_advisory_unlock(CAST(:ns AS integer), "
                                      "CAST(:key AS integer))"),
                                 {"ns": LOCK_NAMESPACE, "key": self._key})
            except Exception:  # noqa: BLE001 - a pooled connection must never keep the lock
                conn.invalidate()
            finally:
                self._held = False
                conn.close()


def engine_of(sessions: sessionmaker) -> Engine:
    """The Engine a sessionmaker is bound to."""
    bind = sessions.kw.get("bind")
    if not isinstance(bind, Engine):
        raise TypeError("the sessionmaker must be bound to a sync Engine")
    return bind


async def try_lock(sessions: sessionmaker, adapter_id: uuid.UUID) -> AliasLock | None:
    """The alias's lock if it is free now, else None."""
    lock = AliasLock(engine_of(sessions), adapter_id)
    try:
        if await asyncio.to_thread(lock.try_acquire):
            return lock
    except BaseException:
        await asyncio.shield(asyncio.to_thread(lock.release))
        raise
    await asyncio.to_thread(lock.release)
    return None


@asynccontextmanager
async def alias_locked(sessions: sessionmaker, adapter_id: uuid.UUID, alias: str,
                       wait_s: float) -> AsyncIterator[float]:
    """Hold the alias's lock for the block (yields seconds waited); SwapInProgress after wait_s."""
    lock = AliasLock(engine_of(sessions), adapter_id)
    t0 = time.perf_counter()
    try:
        while not await asyncio.to_thread(lock.try_acquire):
            if time.perf_counter() - t0 >= wait_s:
                raise SwapInProgress(f"a swap is already in progress for alias {alias!r} "
                                     f"(waited {wait_s:.1f}s for it)", "swap_in_progress")
            await asyncio.sleep(0.05)
        yield time.perf_counter() - t0
    finally:
        # Shielded: a cancelled operation must still give the lock back.
        await asyncio.shield(asyncio.to_thread(lock.release))


# --- DB steps (sync, each one short transaction) -----------------------------------------------

@dataclass(frozen=True)
class _Version:
    id: uuid.UUID
    adapter_id: uuid.UUID
    tenant_id: str
    alias: str
    lora_name: str
    artifact_path: str
    sha256: str
    status: str


@dataclass(frozen=True)
class _Alias:
    id: uuid.UUID
    tenant_id: str
    alias: str
    serving_version_id: uuid.UUID | None
    previous_version_id: uuid.UUID | None
    canary_version_id: uuid.UUID | None


async def db_call(sessions: sessionmaker, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run fn(session, ...) in one transaction on a worker thread."""
    def run() -> T:
        with session_scope(sessions) as session:
            return fn(session, *args, **kwargs)
    return await asyncio.to_thread(run)


def _read_version(session: Session, version_id: uuid.UUID) -> _Version:
    row = session.execute(
        select(AdapterVersion, Adapter.tenant_id, Adapter.alias)
        .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
        .where(AdapterVersion.id == version_id)).first()
    if row is None:
        raise SwapRefused(f"no adapter version {version_id}", "not_found")
    v = row[0]
    return _Version(v.id, v.adapter_id, row.tenant_id, row.alias, v.lora_name, v.artifact_path,
                    v.sha256, v.status)


def _read_alias(session: Session, adapter_id: uuid.UUID) -> _Alias:
    a = session.get(Adapter, adapter_id)
    if a is None:
        raise SwapRefused(f"no adapter {adapter_id}", "not_found")
    return _Alias(a.id, a.tenant_id, a.alias, a.serving_version_id, a.previous_version_id,
                  a.canary_version_id)


def _check_size(session: Session, size: sizing.EngineSize | None, *, new_aliases: int = 0,
                new_canaries: int = 0) -> None:
    if size is None:
        return
    aliases, canaries = desired.alias_demand(session)
    try:
        sizing.check(size, sizing.Demand(aliases + new_aliases, canaries + new_canaries))
    except sizing.EngineTooSmall as e:
        raise SwapRefused(str(e), "engine_too_small") from e


def _mark_failed(session: Session, v: _Version, *, action: str, actor: str, code: str,
                 reason: str, phase: str) -> None:
    session.execute(update(AdapterVersion).where(AdapterVersion.id == v.id)
                    .values(status=VersionStatus.failed.value, failure_reason=f"{code}: {reason}"))
    # A failed canary gets no more traffic.
    session.execute(update(Adapter).where(Adapter.canary_version_id == v.id)
                    .values(canary_version_id=None, canary_share=0.0))
    audit(session, tenant_id=v.tenant_id, actor=actor, action=f"adapter.{action}_failed",
          target_type="adapter_version", target_id=str(v.id), reason=f"{code}: {reason}",
          detail={"alias": v.alias, "lora_name": v.lora_name, "phase": phase})


def _set_status(session: Session, version_id: uuid.UUID | None, status: str, **values: Any) -> None:
    if version_id is not None:
        session.execute(update(AdapterVersion).where(AdapterVersion.id == version_id)
                        .values(status=status, **values))


def _retire_drained(session: Session, adapter: Adapter, keep: set[uuid.UUID | None],
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
        _set_status(session, r.id, VersionStatus.retired.value)
    return [r.lora_name for r in rows]


def _lock_adapter(session: Session, adapter_id: uuid.UUID) -> Adapter:
    # FOR NO KEY UPDATE: the gateway's interaction inserts take KEY SHARE on this row (foreign
    # key); FOR UPDATE would queue the flip behind them under traffic.
    return session.get(Adapter, adapter_id, with_for_update={"key_share": True})


def _flip_swap(session: Session, v: _Version, *, actor: str, reason: str | None, drain_s: float,
               detail: dict) -> tuple[uuid.UUID | None, list[str]]:
    """Make v the alias's serving version; returns (previous version, names to unload)."""
    adapter = _lock_adapter(session, v.adapter_id)
    now = session.scalar(select(func.now()))
    old, last_change = adapter.serving_version_id, adapter.updated_at
    if old is not None:
        _set_status(session, old, VersionStatus.warm.value)
        adapter.previous_version_id = old
    adapter.serving_version_id = v.id
    if adapter.canary_version_id == v.id:  # a promoted canary stops being one
        adapter.canary_version_id, adapter.canary_share = None, 0.0
    _set_status(session, v.id, VersionStatus.live.value, promoted_at=now, failure_reason=None)
    retire = _retire_drained(session, adapter, {old, v.id, adapter.canary_version_id},
                             last_change, now, drain_s)
    adapter.updated_at = now
    audit(session, tenant_id=v.tenant_id, actor=actor, action="adapter.swap", target_type="adapter",
          target_id=str(adapter.id), reason=reason,
          detail={**detail, "alias": v.alias, "from": str(old) if old else None, "to": str(v.id),
                  "lora_name": v.lora_name, "retired": retire})
    return old, retire


def _flip_rollback(session: Session, a: _Alias, target: _Version | None, *, actor: str,
                   reason: str | None, detail: dict) -> None:
    adapter = _lock_adapter(session, a.id)
    now = session.scalar(select(func.now()))
    bad = adapter.serving_version_id
    # The rolled-back version stays loaded through drain_s so stale routes still find it.
    _set_status(session, bad, VersionStatus.warm.value,
                failure_reason=f"rolled back: {reason or 'no reason given'}")
    if target is not None:
        _set_status(session, target.id, VersionStatus.live.value, promoted_at=now,
                    failure_reason=None)
    adapter.serving_version_id = target.id if target else None
    adapter.previous_version_id = None
    adapter.updated_at = now
    audit(session, tenant_id=a.tenant_id, actor=actor, action="adapter.rollback",
          target_type="adapter", target_id=str(a.id), reason=reason,
          detail={**detail, "alias": a.alias, "from": str(bad) if bad else None,
                  "to": str(target.id) if target else None})


def _flip_canary(session: Session, a: _Alias, v: _Version | None, share: float, *, actor: str,
                 reason: str | None, detail: dict) -> None:
    adapter = _lock_adapter(session, a.id)
    now = session.scalar(select(func.now()))
    old = adapter.canary_version_id
    if old is not None and (v is None or old != v.id):
        _set_status(session, old, VersionStatus.warm.value)  # drained, then retired
    if v is not None:
        _set_status(session, v.id, VersionStatus.staged.value, failure_reason=None)
    adapter.canary_version_id = v.id if v else None
    adapter.canary_share = share if v else 0.0
    adapter.updated_at = now
    audit(session, tenant_id=a.tenant_id, actor=actor, action="adapter.canary",
          target_type="adapter", target_id=str(a.id), reason=reason,
          detail={**detail, "alias": a.alias, "from": str(old) if old else None,
                  "to": str(v.id) if v else None, "share": share if v else 0.0})


def _mark_staged(session: Session, v: _Version, *, actor: str, reason: str | None,
                 detail: dict) -> None:
    _set_status(session, v.id, VersionStatus.staged.value, failure_reason=None)
    audit(session, tenant_id=v.tenant_id, actor=actor, action="adapter.stage",
          target_type="adapter_version", target_id=str(v.id), reason=reason,
          detail={**detail, "alias": v.alias, "lora_name": v.lora_name})


# --- replica steps -----------------------------------------------------------------------------

class _Clock:
    """Accumulates phase durations into result.timings."""

    def __init__(self, result: SwapResult) -> None:
        self.result = result
        self.start = self.t = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.result.timings[phase] = self.result.timings.get(phase, 0.0) + now - self.t
        self.t = now


async def _call(result: SwapResult, admin: VllmAdmin, op: str, coro: Any) -> Any:
    t0 = time.perf_counter()
    ok = False
    try:
        value = await coro
        ok = True
        return value
    finally:
        result.calls.append(CallTiming(admin.base_url, op, time.perf_counter() - t0, ok))


async def _healthy(admins: Sequence[VllmAdmin]) -> tuple[list[VllmAdmin], list[str]]:
    up = await asyncio.gather(*(a.health() for a in admins))
    return ([a for a, ok in zip(admins, up, strict=True) if ok],
            [a.base_url for a, ok in zip(admins, up, strict=True) if not ok])


def _first_error(outcomes: list[Any]) -> str | None:
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if not errors:
        return None
    e = errors[0]
    return str(e) if isinstance(e, ReplicaError) else f"{type(e).__name__}: {e}"


async def _load_everywhere(result: SwapResult, admins: Sequence[VllmAdmin], name: str,
                           path: str) -> str | None:
    async def one(admin: VllmAdmin) -> None:
        try:
            await _call(result, admin, "load", admin.load_lora(name, path))
            result.loaded_on.append(admin.base_url)
        except AlreadyLoaded:
            pass  # same name, same artifact: loaded earlier (stage, reconciler)
    return _first_error(await asyncio.gather(*(one(a) for a in admins), return_exceptions=True))


async def _smoke_everywhere(result: SwapResult, admins: Sequence[VllmAdmin], name: str,
                            config: SwapConfig) -> str | None:
    outcomes = await asyncio.gather(
        *(_call(result, a, "smoke", a.smoke(name, config.smoke_prompt, config.smoke_max_tokens))
          for a in admins), return_exceptions=True)
    return _first_error(outcomes)


async def _unload_everywhere(result: SwapResult, admins: Sequence[VllmAdmin],
                             names: Sequence[str]) -> None:
    """Best effort: a replica that misses an unload is fixed by the reconciler."""
    async def one(admin: VllmAdmin, name: str) -> None:
        if await _call(result, admin, "unload", admin.unload_lora(name)):
            result.unloaded.append(f"{name}@{admin.base_url}")
    await asyncio.gather(*(one(a, n) for a in admins for n in names), return_exceptions=True)


async def _verify(v: _Version, config: SwapConfig) -> ArtifactRejected | None:
    try:
        await asyncio.to_thread(verify_artifact, v.artifact_path, expected_sha256=v.sha256,
                                engine_base_model=config.engine_base_model,
                                max_lora_rank=config.max_lora_rank)
    except ArtifactRejected as e:
        return e
    return None


async def _bring_up(result: SwapResult, clock: _Clock, admins: Sequence[VllmAdmin], v: _Version,
                    config: SwapConfig) -> list[VllmAdmin] | None:
    """Verify, then load and smoke v on every healthy replica; None (result failed) on failure.

    Unloads nothing on failure: the caller decides whether the version may stay loaded.
    """
    rejected = await _verify(v, config)
    clock.lap("verify")
    if rejected is not None:
        result._fail("verify", rejected.code, rejected.reason)
        return None
    healthy, result.skipped = await _healthy(admins)
    result.replicas = [a.base_url for a in healthy]
    clock.lap("health")
    if not healthy:
        raise SwapRefused(f"no healthy vLLM replica among {[a.base_url for a in admins]}",
                          "no_replica")
    error = await _load_everywhere(result, healthy, v.lora_name, v.artifact_path)
    clock.lap("load")
    if error:
        result._fail("load", "load_failed", error)
        return None
    error = await _smoke_everywhere(result, healthy, v.lora_name, config)
    clock.lap("smoke")
    if error:
        result._fail("smoke", "smoke_failed", error)
        return None
    return healthy


async def _abandon(sessions: sessionmaker, result: SwapResult, clock: _Clock,
                   admins: Sequence[VllmAdmin], v: _Version, *, actor: str) -> SwapResult:
    """Undo a failed bring-up: unload the version everywhere and mark it failed."""
    if result.phase != "verify" or v.status == VersionStatus.staged.value:
        # Every replica, not only those that said yes: a timed-out load may still land.
        await _unload_everywhere(result, admins, [v.lora_name])
        clock.lap("cleanup")
    await db_call(sessions, _mark_failed, v, action=result.action, actor=actor,
                  code=result.code or "failed", reason=result.reason or "",
                  phase=result.phase or "")
    return result


def _result(action: str, v: _Version) -> SwapResult:
    return SwapResult(action=action, adapter_id=v.adapter_id, tenant_id=v.tenant_id,
                      alias=v.alias, version_id=v.id, lora_name=v.lora_name)


def _base_result(action: str, a: _Alias) -> SwapResult:
    """A result whose target is the base model (or no canary)."""
    return SwapResult(action=action, adapter_id=a.id, tenant_id=a.tenant_id, alias=a.alias,
                      version_id=None, lora_name=None)


def _require_loadable(v: _Version, a: _Alias) -> None:
    if v.id == a.serving_version_id:
        raise SwapRefused(f"{v.lora_name} is already live on {a.alias!r}", "already_live")
    if v.status not in LOADABLE:
        raise SwapRefused(f"{v.lora_name} is {v.status}; only {', '.join(LOADABLE)} versions "
                          "can be swapped in (use rollback for a previous version)", "bad_state")


# --- operations --------------------------------------------------------------------------------

async def swap(sessions: sessionmaker, admins: Sequence[VllmAdmin], version_id: uuid.UUID,
               config: SwapConfig, *, actor: str = "system", reason: str | None = None
               ) -> SwapResult:
    """Make a version its alias's serving version on every healthy replica (see module doc)."""
    v = await db_call(sessions, _read_version, version_id)
    result = _result("swap", v)
    t0 = time.perf_counter()
    async with alias_locked(sessions, v.adapter_id, v.alias, config.lock_wait_s) as waited:
        result.timings["lock"] = waited
        v = await db_call(sessions, _read_version, version_id)  # as of now, under the lock
        a = await db_call(sessions, _read_alias, v.adapter_id)
        _require_loadable(v, a)
        if a.serving_version_id is None:
            await db_call(sessions, _check_size, config.engine_size, new_aliases=1)
        clock = _Clock(result)
        healthy = await _bring_up(result, clock, admins, v, config)
        if healthy is None:
            return await _abandon(sessions, result, clock, admins, v, actor=actor)
        detail = {"replicas": result.replicas, "skipped": result.skipped,
                  "timings": dict(result.timings)}
        result.previous_version_id, retire = await db_call(
            sessions, _flip_swap, v, actor=actor, reason=reason, drain_s=config.drain_s,
            detail=detail)
        result.flipped_at = time.time()
        clock.lap("flip")
        result.ok = True
        # Verify to live on all replicas: what the benchmark compares with the raw vLLM calls.
        result.timings["swap"] = time.perf_counter() - clock.start
        if retire:
            await _unload_everywhere(result, healthy, retire)
            clock.lap("unload")
    result.timings["total"] = time.perf_counter() - t0
    return result


async def rollback(sessions: sessionmaker, admins: Sequence[VllmAdmin], adapter_id: uuid.UUID,
                   config: SwapConfig, *, actor: str = "system", reason: str | None = None
                   ) -> SwapResult:
    """Serve the alias's previous version again (the base model when there is none).

    Instant while the previous version is warm: it is only loaded on replicas that lack it (a
    restarted one). Once retired it is verified, reloaded and smoke-tested first; a failure then
    leaves the alias as it was (the version is marked failed only if its artifact is refused).
    """
    a = await db_call(sessions, _read_alias, adapter_id)
    t0 = time.perf_counter()
    async with alias_locked(sessions, a.id, a.alias, config.lock_wait_s) as waited:
        a = await db_call(sessions, _read_alias, adapter_id)
        if a.serving_version_id is None:
            raise SwapRefused(f"alias {a.alias!r} serves the base model: nothing to roll back",
                              "nothing_to_roll_back")
        target = (await db_call(sessions, _read_version, a.previous_version_id)
                  if a.previous_version_id else None)
        result = _result("rollback", target) if target else _base_result("rollback", a)
        result.timings["lock"] = waited
        result.previous_version_id = a.serving_version_id
        clock = _Clock(result)
        if target is not None and target.status == VersionStatus.failed.value:
            raise SwapRefused(f"previous version {target.lora_name} is failed", "bad_state")
        if target is not None:
            if not await _ensure_loaded(sessions, result, clock, admins, target, config,
                                        actor=actor):
                return result
        await db_call(sessions, _flip_rollback, a, target, actor=actor, reason=reason,
                      detail={"replicas": result.replicas, "loaded_on": result.loaded_on})
        result.flipped_at = time.time()
        clock.lap("flip")
        result.ok = True
        result.timings["swap"] = time.perf_counter() - clock.start
    result.timings["total"] = time.perf_counter() - t0
    return result


async def _ensure_loaded(sessions: sessionmaker, result: SwapResult, clock: _Clock,
                         admins: Sequence[VllmAdmin], v: _Version, config: SwapConfig, *,
                         actor: str) -> bool:
    """Make sure every healthy replica holds v: only the ones lacking it load (and smoke) it."""
    listed = await asyncio.gather(*(a.loaded_loras() for a in admins), return_exceptions=True)
    seen = {a.base_url: got for a, got in zip(admins, listed, strict=True)
            if not isinstance(got, BaseException)}
    healthy = [a for a in admins if a.base_url in seen]
    result.skipped = [a.base_url for a in admins if a.base_url not in seen]
    result.replicas = [a.base_url for a in healthy]
    lacking = [a for a in healthy if v.lora_name not in seen[a.base_url]]
    clock.lap("health")
    if not healthy:
        raise SwapRefused(f"no healthy vLLM replica among {[a.base_url for a in admins]}",
                          "no_replica")
    if not lacking:
        return True
    was_desired = v.status in desired.LOADED_STATUSES
    if not was_desired:
        rejected = await _verify(v, config)
        clock.lap("verify")
        if rejected is not None:
            result._fail("verify", rejected.code, rejected.reason)
            await db_call(sessions, _mark_failed, v, action=result.action, actor=actor,
                          code=rejected.code, reason=rejected.reason, phase="verify")
            return False
    error = await _load_everywhere(result, lacking, v.lora_name, v.artifact_path)
    clock.lap("load")
    if not error:
        error = await _smoke_everywhere(result, lacking, v.lora_name, config)
        clock.lap("smoke")
        if error:
            result._fail("smoke", "smoke_failed", error)
    else:
        result._fail("load", "load_failed", error)
    if error and not was_desired:
        await _unload_everywhere(result, lacking, [v.lora_name])
    return not error


async def stage(sessions: sessionmaker, admins: Sequence[VllmAdmin], version_id: uuid.UUID,
                config: SwapConfig, *, actor: str = "system", reason: str | None = None
                ) -> SwapResult:
    """Verify, load and smoke a version on every healthy replica without routing to it."""
    v = await db_call(sessions, _read_version, version_id)
    result = _result("stage", v)
    t0 = time.perf_counter()
    async with alias_locked(sessions, v.adapter_id, v.alias, config.lock_wait_s) as waited:
        result.timings["lock"] = waited
        v = await db_call(sessions, _read_version, version_id)
        _require_loadable(v, await db_call(sessions, _read_alias, v.adapter_id))
        clock = _Clock(result)
        if await _bring_up(result, clock, admins, v, config) is None:
            return await _abandon(sessions, result, clock, admins, v, actor=actor)
        await db_call(sessions, _mark_staged, v, actor=actor, reason=reason,
                      detail={"replicas": result.replicas})
        clock.lap("flip")
        result.ok = True
    result.timings["total"] = time.perf_counter() - t0
    return result


async def set_canary(sessions: sessionmaker, admins: Sequence[VllmAdmin], adapter_id: uuid.UUID,
                     version_id: uuid.UUID | None, share: float, config: SwapConfig, *,
                     actor: str = "system", reason: str | None = None) -> SwapResult:
    """Send ``share`` of the alias's traffic to a version (sticky per `user`); None or 0 clears.

    The version is verified, loaded and smoke-tested first, exactly as for a swap. Promote it with
    swap(); the previous canary (if any) stays loaded through drain_s.
    """
    if not 0.0 <= share < 1.0:
        raise SwapRefused(f"canary share must be in [0, 1), got {share} (use swap for 1)",
                          "bad_share")
    a = await db_call(sessions, _read_alias, adapter_id)
    clearing = version_id is None or share == 0.0
    t0 = time.perf_counter()
    async with alias_locked(sessions, a.id, a.alias, config.lock_wait_s) as waited:
        a = await db_call(sessions, _read_alias, adapter_id)
        v = None if clearing else await db_call(sessions, _read_version, version_id)
        if v is not None and v.adapter_id != a.id:
            raise SwapRefused(f"{v.lora_name} belongs to another alias", "wrong_alias")
        result = _result("canary", v) if v else _base_result("canary", a)
        result.timings["lock"] = waited
        clock = _Clock(result)
        if v is not None:
            _require_loadable(v, a)
            if a.canary_version_id is None:
                await db_call(sessions, _check_size, config.engine_size, new_canaries=1)
            # Already the canary: only its share changes, it is loaded and routed already.
            if v.id != a.canary_version_id and \
                    await _bring_up(result, clock, admins, v, config) is None:
                return await _abandon(sessions, result, clock, admins, v, actor=actor)
        await db_call(sessions, _flip_canary, a, v, share, actor=actor, reason=reason,
                      detail={"replicas": result.replicas})
        result.flipped_at = time.time()
        clock.lap("flip")
        result.ok = True
    result.timings["total"] = time.perf_counter() - t0
    return result
