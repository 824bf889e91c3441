"""The app factory. `uvicorn service.api.app:create_app --factory` or `flywheel api`."""

from __future__ import annotations

import asyncio
import gc
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy.engine import make_url

from service import __version__
from service.api import errors
from service.api.auth_guard import FailedAuthThrottle
from service.api.limits import BodyLimitMiddleware
from service.api.observe import RequestMetricsMiddleware
from service.api.routes import (
    adapters,
    audit,
    exports,
    feedback,
    gateway,
    health,
    imports,
    ops_page,
    replicas,
    runs,
)
from service.api.state import AppState, TTLCache
from service.config import Settings, get_settings
from service.db import hotpath, migrate
from service.db.session import make_async_engine, make_async_sessionmaker, make_sync_engine
from service.domain.policy import PolicyStore
from service.engine import watcher as engine_watcher
from service.engine.discovery import Discovery
from service.engine.replicas import ReplicaPool
from service.local.embedded import resolve_service_urls

log = logging.getLogger(__name__)


def _check_schema(db_url: str, timeout_s: float) -> None:
    engine = make_sync_engine(db_url, connect_timeout_s=timeout_s, pool_size=1)
    try:
        migrate.check_migrated(engine, db_url)
    finally:
        engine.dispose()


def build_state(settings: Settings) -> AppState:
    """Connect to (or start) the services and check the schema; raises NotMigrated if behind."""
    db_url, broker_url = resolve_service_urls(settings)
    _check_schema(db_url, settings.db_connect_timeout_s)
    engine = make_async_engine(db_url, pool_size=settings.db_pool_size,
                               max_overflow=settings.db_max_overflow,
                               connect_timeout_s=settings.db_connect_timeout_s)
    # FLYWHEEL_VLLM_URLS resolved once here (a name may be many replicas); the watcher follows it.
    discovery = Discovery(settings.vllm_url_list)
    pool = ReplicaPool(discovery.urls, base_name=settings.base_model_name,
                       connect_timeout_s=settings.upstream_connect_timeout_s,
                       read_timeout_s=settings.upstream_timeout_s,
                       sources={u: discovery.source_of(u) or u for u in discovery.urls})
    # Short timeouts, no retries: Redis is off the critical path (rate limits fail open).
    redis = Redis.from_url(broker_url, socket_connect_timeout=0.5, socket_timeout=0.5,
                           retry=Retry(NoBackoff(), 0))
    fast_pool = hotpath.make_pool(db_url, size=settings.db_pool_size,
                                  timeout_s=settings.db_connect_timeout_s)
    return AppState(settings=settings, db_url=db_url, broker_url=broker_url, engine=engine,
                    sessions=make_async_sessionmaker(engine), fast_pool=fast_pool, pool=pool,
                    discovery=discovery, redis=redis,
                    auth_cache=TTLCache(settings.auth_cache_ttl_s),
                    auth_misses=TTLCache(settings.auth_cache_ttl_s),
                    failed_auth=FailedAuthThrottle(settings.auth_failures_per_minute),
                    route_cache=TTLCache(settings.routing_cache_ttl_s),
                    policies=PolicyStore(settings.policy_dir))


def create_app(settings: Settings | None = None) -> FastAPI:
    """A configured FastAPI app; services are connected in its lifespan."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = await asyncio.to_thread(build_state, settings)
        # Not waiting for connections: the API must start (and answer 503) while Postgres is down.
        await state.fast_pool.open(wait=False)
        app.state.fw = state
        # Everything imported and built so far lives as long as the process: out of the
        # collector's way, a full collection no longer stalls requests for ~100 ms (p99 in
        # BENCHMARKS.md section 2).
        gc.collect()
        gc.freeze()
        # Adopts what a previous process left in the spool; written back by the replay loop.
        state.outbox.open()
        trigger_task = asyncio.create_task(state.trigger.run(), name="trigger-loop")
        replay_task = asyncio.create_task(
            state.outbox.run(settings.spool_replay_interval_s), name="spool-replay")
        # Keeps state.pool following the replicas and converges them to the DB's desired state.
        watcher = engine_watcher.watcher_from_settings(
            settings, state.db_url, state.pool, state.discovery,
            bound_for=state.policies.max_resident_versions)
        log.info("flywheel API ready: db=%s replicas=%s", make_url(state.db_url).render_as_string(
            hide_password=True), state.pool.urls)
        try:
            await watcher.start(settings)  # EngineTooSmall here stops the API with the reason
            yield
        finally:
            trigger_task.cancel()
            replay_task.cancel()
            await asyncio.gather(trigger_task, replay_task, return_exceptions=True)
            await watcher.aclose()
            await state.aclose()

    app = FastAPI(title="Flywheel", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible gateway with feedback-driven LoRA retraining.")
    errors.install(app, settings.retry_after_s)
    app.include_router(gateway.router)
    app.include_router(feedback.router)
    app.include_router(runs.router)
    app.include_router(adapters.router)
    app.include_router(exports.router)
    app.include_router(imports.router)
    app.include_router(audit.router)
    app.include_router(health.router)
    app.include_router(ops_page.router)
    app.include_router(replicas.router)

    app.add_middleware(RequestMetricsMiddleware)
    # Outermost, so oversized bodies are refused before anything reads them.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       path_limits=[(imports.IMPORT_PATH, settings.import_max_bytes),
                                    (imports.ADAPTER_UPLOAD_PATH, settings.adapter_upload_max_bytes)])
    return app
