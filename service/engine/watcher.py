"""The engine's background loops in every API process.

- discovery: re-resolves FLYWHEEL_VLLM_URLS every ``replica_discovery_interval_s``
  (discovery.py). A new replica joins the pool at once, routed for the base model only; the
  reconciler is woken to load the desired versions there, and the observer lets the gateway route
  each version to it once it holds it. A vanished replica leaves the pool, its clients and its
  engine_replicas row.
- observer: feeds GET /v1/models into the ReplicaPool every ``replica_observe_interval_s`` (a
  replica that does not answer is out of routing until it does; a version is routed only to
  replicas that hold it).
- reconciler: reconcile_once() every ``reconcile_interval_s`` (reconcile.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from service.config import Settings
from service.db.session import db_call, make_sync_engine
from service.engine import sizing
from service.engine.discovery import Change, Discovery
from service.engine.reconcile import (
    ReconcileReport,
    Verify,
    apply_to_pool,
    forget_replicas,
    observe,
    reconcile_once,
    settings_verifier,
)
from service.engine.replicas import ReplicaPool
from service.engine.residency import BoundFor, default_bound
from service.engine.vllm_admin import VllmAdmin

log = logging.getLogger(__name__)

# Observing must not stall on a hung replica; loads may legitimately take longer.
OBSERVE_TIMEOUT_S = 3.0
CONTROL_TIMEOUT_S = 60.0


class EngineWatcher:
    """Discovery, observer and reconciler loops for one API process; start() then aclose()."""

    def __init__(self, pool: ReplicaPool, sessions: sessionmaker, discovery: Discovery, *,
                 observe_interval_s: float, reconcile_interval_s: float, warm_grace_s: float,
                 drain_s: float, verify: Verify, discovery_interval_s: float = 0.0,
                 bound_for: BoundFor = default_bound, connect_timeout_s: float = 2.0) -> None:
        self.pool = pool
        self.sessions = sessions
        self.discovery = discovery
        self.verify = verify
        self.bound_for = bound_for
        self.observe_interval_s = observe_interval_s
        self.reconcile_interval_s = reconcile_interval_s
        self.discovery_interval_s = discovery_interval_s
        self.warm_grace_s = warm_grace_s
        self.drain_s = drain_s
        self.connect_timeout_s = connect_timeout_s
        self._observers: dict[str, VllmAdmin] = {}
        self._controls: dict[str, VllmAdmin] = {}
        for url in discovery.urls:
            self._open(url)
        # A round's admins are closed (and its rows forgotten) only between rounds.
        self._round = asyncio.Lock()
        self._wake = asyncio.Event()  # a replica appeared: reconcile now, not at the next tick
        self._unforgotten: set[str] = set()
        self._tasks: list[asyncio.Task] = []
        self.last_report: ReconcileReport | None = None

    def _open(self, url: str) -> None:
        self._observers[url] = VllmAdmin(url, timeout_s=OBSERVE_TIMEOUT_S,
                                         connect_timeout_s=self.connect_timeout_s, get_retries=0)
        self._controls[url] = VllmAdmin(url, timeout_s=CONTROL_TIMEOUT_S,
                                        connect_timeout_s=self.connect_timeout_s)

    async def start(self, settings: Settings | None = None) -> None:
        """Check the engine's sizing (when given settings), then start the loops.

        Raises EngineTooSmall when FLYWHEEL_ENGINE_SIZING_CHECK=error and the engine is too small.
        """
        if settings is not None:
            warning = await asyncio.to_thread(check_sizing, self.sessions, settings)
            if warning:
                log.warning("%s", warning)
        if not self.discovery.entries:
            return
        self._tasks.append(asyncio.create_task(self._observe_loop(), name="replica-observer"))
        if self.reconcile_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="reconciler"))
        if self.discovery_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._discovery_loop(), name="discovery"))

    async def aclose(self) -> None:
        """Cancel the loops and close clients and the DB engine."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for a in [*self._observers.values(), *self._controls.values()]:
            await a.aclose()
        self.sessions.kw["bind"].dispose()

    async def rediscover(self) -> Change:
        """Resolve the configured names again and apply what changed."""
        change = await self.discovery.refresh()
        gone: list[VllmAdmin] = []
        for url in change.removed:
            self.pool.remove(url)
            gone += [self._observers.pop(url), self._controls.pop(url)]
        for url in change.added:
            self._open(url)
            self.pool.add(url, self.discovery.source_of(url))
            self._unforgotten.discard(url)
        if change:
            log.info("replica discovery: added %s, removed %s", change.added, change.removed)
        self._unforgotten |= set(change.removed)
        if gone or self._unforgotten:
            async with self._round:  # not under a round that still uses them
                for a in gone:
                    await a.aclose()
                await self._forget()
        if change.added:
            self._wake.set()
        return change

    async def _forget(self) -> None:
        if not self._unforgotten:
            return
        try:
            await db_call(self.sessions, forget_replicas, sorted(self._unforgotten))
            self._unforgotten.clear()
        except SQLAlchemyError as e:  # the database is down: try again next time
            log.warning("replica discovery: could not drop gone replicas' rows: %s", e)

    async def _discovery_loop(self) -> None:
        while True:
            await asyncio.sleep(self.discovery_interval_s)
            try:
                await self.rediscover()
            except Exception:  # noqa: BLE001 - the loop must outlive any one failure
                log.exception("replica discovery failed")

    async def _observe_loop(self) -> None:
        while True:
            try:
                apply_to_pool(self.pool, await observe(list(self._observers.values())))
            except Exception:  # noqa: BLE001 - the loop must outlive any one failure
                log.exception("replica observation failed")
            await asyncio.sleep(self.observe_interval_s)

    async def _reconcile_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                async with self._round:
                    self.last_report = await reconcile_once(
                        self.sessions, list(self._controls.values()),
                        warm_grace_s=self.warm_grace_s, drain_s=self.drain_s, verify=self.verify,
                        pool=self.pool, bound_for=self.bound_for)
                for e in self.last_report.errors:
                    log.warning("reconcile: %s", e)
            except Exception as exc:  # noqa: BLE001 - e.g. the database is down: try next round
                log.warning("reconcile round failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.reconcile_interval_s)


def watcher_from_settings(settings: Settings, db_url: str, pool: ReplicaPool,
                          discovery: Discovery, bound_for: BoundFor = default_bound
                          ) -> EngineWatcher:
    """An EngineWatcher for this process's replicas, with its own small sync DB pool."""
    engine = make_sync_engine(db_url, connect_timeout_s=settings.db_connect_timeout_s, pool_size=2)
    return EngineWatcher(pool, sessionmaker(engine, expire_on_commit=False), discovery,
                         observe_interval_s=settings.replica_observe_interval_s,
                         reconcile_interval_s=settings.reconcile_interval_s,
                         discovery_interval_s=settings.replica_discovery_interval_s,
                         warm_grace_s=settings.warm_grace_s, drain_s=settings.drain_s,
                         verify=settings_verifier(settings), bound_for=bound_for,
                         connect_timeout_s=settings.upstream_connect_timeout_s)


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
