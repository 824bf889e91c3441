"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service import metrics, metrics_db, metrics_redact, metrics_replicas
from service.api.deps import State
from service.api.errors import ApiError

router = APIRouter(tags=["health"])

_CHECK_TIMEOUT_S = 2.0


@router.get("/healthz")
async def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


async def _check_db(state) -> str | None:
    async with state.sessions() as session:
        await session.execute(text("SELECT 1"))
    return None  # a failure raises


async def _check_broker(state) -> str | None:
    await state.redis.ping()
    return None  # a failure raises


async def _check_engine(state) -> str | None:
    if not state.pool.replicas:
        return "no vLLM replicas configured"
    results = await asyncio.gather(
        *(r.client.get("/health", timeout=_CHECK_TIMEOUT_S) for r in state.pool.replicas),
        return_exceptions=True,
    )
    if not any(not isinstance(x, BaseException) and x.status_code == 200 for x in results):
        return "no healthy vLLM replica"
    return None


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    """Ready when the database, the broker and at least one vLLM replica answer."""
    checks = {"database": _check_db, "broker": _check_broker, "engine": _check_engine}
    report: dict[str, str] = {}
    for name, check in checks.items():
        try:
            problem = await asyncio.wait_for(check(state), _CHECK_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            problem = f"{type(exc).__name__}"
        report[name] = "ok" if problem is None else f"unavailable: {problem}"
    ready = all(v == "ok" for v in report.values())
    # Not a readiness failure (the process can serve everything else) but never hidden: a
    # version whose artifact changed on disk is refused and listed here until it is fixed (by
    # version id and code: this route is public; the audit event has names and the reason).
    body = {"ready": ready, "checks": report,
            "refused_artifacts": [{"version_id": v, "code": c}
                                  for v, c in sorted(state.pool.refused.items())],
            # What this process holds for Postgres (written back in order once it answers).
            "spool": {"records": state.outbox.depth, "bytes": state.outbox.spool.size},
            # Each FLYWHEEL_VLLM_URLS entry: how many replicas it gave, and why its last lookup
            # failed (its last known replicas are kept meanwhile; not a readiness failure).
            "replica_discovery": [{"name": lk.entry, "replicas": len(lk.urls), "error": lk.error}
                                  for lk in state.discovery.lookups.values()]}
    return JSONResponse(body, status_code=200 if ready else 503,
                        headers=None if ready else {"Retry-After": str(state.settings.retry_after_s)})


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(state: State,
                             authorization: Annotated[str | None, Header()] = None) -> Response:
    """This process's (or, in multiprocess mode, all API processes') metrics, plus the loop's
    state from Postgres (omitted, not failed, while the database is down). With
    FLYWHEEL_METRICS_TOKEN set: every series, for a bearer of that token only. Without: the
    tenant-free series (service.metrics_redact), to anyone."""
    token = state.settings.metrics_token
    if token is not None:
        sent = (authorization or "").partition(" ")[2].strip()
        if not hmac.compare_digest(sent.encode(), token.get_secret_value().encode()):
            raise ApiError(401, "metrics need the metrics token: Authorization: Bearer <token>",
                           code="invalid_metrics_token", headers={"WWW-Authenticate": "Bearer"})
    body, content_type = metrics.render(state.settings.prometheus_multiproc_dir is not None)
    body += await _db_metrics(state)
    body += _spool_metrics(state)
    body += metrics_replicas.exposition(metrics_replicas.discovery_families(state.pool,
                                                                           state.discovery))
    if token is None:
        body = metrics_redact.tenant_free(body.decode()).encode()
    return Response(body, media_type=content_type)


def _spool_metrics(state) -> bytes:
    return (f"# HELP flywheel_spool_records Records this API process holds in its local spool "
            f"for Postgres\n# TYPE flywheel_spool_records gauge\n"
            f"flywheel_spool_records {state.outbox.depth}\n"
            f"# HELP flywheel_spool_bytes Bytes of this API process's local spool\n"
            f"# TYPE flywheel_spool_bytes gauge\nflywheel_spool_bytes {state.outbox.spool.size}\n"
            ).encode()


async def _db_metrics(state) -> bytes:
    """The loop's state from Postgres, cached for metrics_cache_s: seven aggregate queries per
    scrape would otherwise run as often as anyone scrapes."""
    now = time.monotonic()
    cached = state.metrics_db_cache
    if cached is not None and cached[0] > now:
        return cached[1]
    try:
        async with state.sessions() as session:
            aliases = (await session.execute(text("SELECT tenant_id, alias FROM adapters"))).all()
            thresholds = {(t, a): state.policies.for_alias(a, t).trigger.min_new_ratings
                          for t, a in aliases}
            body = await metrics_db.render(
                session, thresholds, [(r.url, r.is_up()) for r in state.pool.replicas])
            body += metrics_replicas.exposition(
                await metrics_replicas.resident_families(session, state.pool))
    except Exception:  # noqa: BLE001 - scrapes must not fail with the DB; the gap shows the outage
        metrics.SCRAPE_DB_FAILURES.inc()
        return b""
    state.metrics_db_cache = (now + state.settings.metrics_cache_s, body)
    return body
