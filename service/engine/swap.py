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
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy.orm import sessionmaker

from service.config import Settings
from service.db.models import VersionStatus
from service.db.session import db_call
from service.engine import desired, sizing, swap_db
from service.engine.alias_lock import alias_locked
from service.engine.artifact import ArtifactRejected, verify_artifact
from service.engine.errors import SwapError, SwapInProgress, SwapRefused  # noqa: F401 - API
from service.engine.swap_db import Alias, Version
from service.engine.vllm_admin import AlreadyLoaded, ReplicaError, VllmAdmin

# Versions a swap, stage or canary may load: never one that is or was serving (use rollback).
LOADABLE = (VersionStatus.candidate.value, VersionStatus.staged.value, VersionStatus.failed.value)


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
        """The config of this deployment (adapters are verified against its base model)."""
        if settings.drain_s <= settings.routing_cache_ttl_s:
            raise ValueError(f"FLYWHEEL_DRAIN_S ({settings.drain_s}) must exceed "
                             f"FLYWHEEL_ROUTING_CACHE_TTL_S ({settings.routing_cache_ttl_s})")
        return cls(engine_base_model=settings.resolved_base_model,
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


async def _verify(v: Version, config: SwapConfig) -> ArtifactRejected | None:
    try:
        await asyncio.to_thread(verify_artifact, v.artifact_path, expected_sha256=v.sha256,
                                engine_base_model=config.engine_base_model,
                                max_lora_rank=config.max_lora_rank)
    except ArtifactRejected as e:
        return e
    return None


async def _bring_up(result: SwapResult, clock: _Clock, admins: Sequence[VllmAdmin], v: Version,
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
                   admins: Sequence[VllmAdmin], v: Version, *, actor: str) -> SwapResult:
    """Undo a failed bring-up: unload the version everywhere and mark it failed."""
    if result.phase != "verify" or v.status == VersionStatus.staged.value:
        # Every replica, not only those that said yes: a timed-out load may still land.
        await _unload_everywhere(result, admins, [v.lora_name])
        clock.lap("cleanup")
    await db_call(sessions, swap_db.mark_failed, v, action=result.action, actor=actor,
                  code=result.code or "failed", reason=result.reason or "",
                  phase=result.phase or "")
    return result


def _result(action: str, v: Version) -> SwapResult:
    return SwapResult(action=action, adapter_id=v.adapter_id, tenant_id=v.tenant_id,
                      alias=v.alias, version_id=v.id, lora_name=v.lora_name)


def _base_result(action: str, a: Alias) -> SwapResult:
    """A result whose target is the base model (or no canary)."""
    return SwapResult(action=action, adapter_id=a.id, tenant_id=a.tenant_id, alias=a.alias,
                      version_id=None, lora_name=None)


def _require_loadable(v: Version, a: Alias) -> None:
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
    v = await db_call(sessions, swap_db.read_version, version_id)
    result = _result("swap", v)
    t0 = time.perf_counter()
    async with alias_locked(sessions, v.adapter_id, v.alias, config.lock_wait_s) as waited:
        result.timings["lock"] = waited
        v = await db_call(sessions, swap_db.read_version, version_id)  # as of now, under the lock
        a = await db_call(sessions, swap_db.read_alias, v.adapter_id)
        _require_loadable(v, a)
        if a.serving_version_id is None:
            await db_call(sessions, swap_db.check_size, config.engine_size, new_aliases=1)
        clock = _Clock(result)
        healthy = await _bring_up(result, clock, admins, v, config)
        if healthy is None:
            return await _abandon(sessions, result, clock, admins, v, actor=actor)
        detail = {"replicas": result.replicas, "skipped": result.skipped,
                  "timings": dict(result.timings)}
        result.previous_version_id, retire = await db_call(
            sessions, swap_db.flip_swap, v, actor=actor, reason=reason, drain_s=config.drain_s,
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

    Instant while the previous version is warm on every replica. Where a replica lacks it (a
    restarted one, or it was retired) it is verified, loaded and smoke-tested first; a failure
    then leaves the alias as it was (the version is marked failed only if its artifact is
    refused).
    """
    a = await db_call(sessions, swap_db.read_alias, adapter_id)
    t0 = time.perf_counter()
    async with alias_locked(sessions, a.id, a.alias, config.lock_wait_s) as waited:
        a = await db_call(sessions, swap_db.read_alias, adapter_id)
        if a.serving_version_id is None:
            raise SwapRefused(f"alias {a.alias!r} serves the base model: nothing to roll back",
                              "nothing_to_roll_back")
        target = (await db_call(sessions, swap_db.read_version, a.previous_version_id)
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
        await db_call(sessions, swap_db.flip_rollback, a, target, actor=actor, reason=reason,
                      detail={"replicas": result.replicas, "loaded_on": result.loaded_on})
        result.flipped_at = time.time()
        clock.lap("flip")
        result.ok = True
        result.timings["swap"] = time.perf_counter() - clock.start
    result.timings["total"] = time.perf_counter() - t0
    return result


async def _ensure_loaded(sessions: sessionmaker, result: SwapResult, clock: _Clock,
                         admins: Sequence[VllmAdmin], v: Version, config: SwapConfig, *,
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
    # Every load is verified, a desired (warm) version's too: its file may have changed on
    # disk since it was first loaded.
    rejected = await _verify(v, config)
    clock.lap("verify")
    if rejected is not None:
        result._fail("verify", rejected.code, rejected.reason)
        await db_call(sessions, swap_db.mark_failed, v, action=result.action, actor=actor,
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
    v = await db_call(sessions, swap_db.read_version, version_id)
    result = _result("stage", v)
    t0 = time.perf_counter()
    async with alias_locked(sessions, v.adapter_id, v.alias, config.lock_wait_s) as waited:
        result.timings["lock"] = waited
        v = await db_call(sessions, swap_db.read_version, version_id)
        _require_loadable(v, await db_call(sessions, swap_db.read_alias, v.adapter_id))
        clock = _Clock(result)
        if await _bring_up(result, clock, admins, v, config) is None:
            return await _abandon(sessions, result, clock, admins, v, actor=actor)
        await db_call(sessions, swap_db.mark_staged, v, actor=actor, reason=reason,
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
    a = await db_call(sessions, swap_db.read_alias, adapter_id)
    clearing = version_id is None or share == 0.0
    t0 = time.perf_counter()
    async with alias_locked(sessions, a.id, a.alias, config.lock_wait_s) as waited:
        a = await db_call(sessions, swap_db.read_alias, adapter_id)
        v = None if clearing else await db_call(sessions, swap_db.read_version, version_id)
        if v is not None and v.adapter_id != a.id:
            raise SwapRefused(f"{v.lora_name} belongs to another alias", "wrong_alias")
        result = _result("canary", v) if v else _base_result("canary", a)
        result.timings["lock"] = waited
        clock = _Clock(result)
        if v is not None:
            _require_loadable(v, a)
            if a.canary_version_id is None:
                await db_call(sessions, swap_db.check_size, config.engine_size, new_canaries=1)
            # Already the canary: only its share changes, it is loaded and routed already.
            if v.id != a.canary_version_id and \
                    await _bring_up(result, clock, admins, v, config) is None:
                return await _abandon(sessions, result, clock, admins, v, actor=actor)
        await db_call(sessions, swap_db.flip_canary, a, v, share, actor=actor, reason=reason,
                      detail={"replicas": result.replicas})
        result.flipped_at = time.time()
        clock.lap("flip")
        result.ok = True
    result.timings["total"] = time.perf_counter() - t0
    return result
