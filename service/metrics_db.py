"""Loop metrics read from Postgres at scrape time: correct whichever process (API, worker, beat,
another container) did the work, with no shared multiprocess files."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from service.domain.judge_stats import METRIC_QUERIES as _JUDGE_QUERIES

_QUERIES = {
    "runs": "SELECT state, count(*) AS n FROM training_runs GROUP BY state",
    "buffer": """
        SELECT a.tenant_id, a.alias, count(f.id) AS n FROM adapters a
        LEFT JOIN feedback f ON f.adapter_id = a.id AND f.seq > a.feedback_watermark
        GROUP BY a.tenant_id, a.alias""",
    "training": """
        SELECT DISTINCT ON (a.alias, a.tenant_id) a.tenant_id, a.alias,
               (r.metrics->'training'->>'seconds')::float8 AS seconds,
               (r.metrics->'training'->>'tokens_per_s')::float8 AS tps
        FROM training_runs r JOIN adapters a ON a.id = r.adapter_id
        WHERE r.metrics ? 'training' ORDER BY a.alias, a.tenant_id, r.created_at DESC""",
    "verdicts": """
        SELECT CASE WHEN (verdict->>'passed')::boolean THEN 'passed' ELSE 'failed' END AS v,
               count(*) AS n FROM training_runs WHERE verdict ? 'passed' GROUP BY 1""",
    "swap": """
        SELECT DISTINCT ON (a.alias, a.tenant_id) a.tenant_id, a.alias,
               (r.metrics->'deploy'->'timings'->>'swap')::float8 AS seconds
        FROM training_runs r JOIN adapters a ON a.id = r.adapter_id
        WHERE r.metrics->'deploy'->'timings' ? 'swap'
        ORDER BY a.alias, a.tenant_id, r.updated_at DESC""",
    "rollbacks": """
        SELECT tenant_id, actor = 'watch' AS automatic, count(*) AS n FROM audit_events
        WHERE action = 'adapter.rollback' GROUP BY tenant_id, automatic""",
    "exports": """
        SELECT tenant_id, format, coalesce(quant, '') AS quant, status, count(*) AS n,
               max(bytes) FILTER (WHERE status = 'passed') AS bytes
        FROM exports GROUP BY tenant_id, format, coalesce(quant, ''), status""",
    **_JUDGE_QUERIES,
}


async def render(session: AsyncSession, thresholds: dict[tuple[str, str], int],
                 replicas: list[tuple[str, bool]]) -> bytes:
    """Exposition text for the loop's state. thresholds: (tenant, alias) -> trigger threshold."""
    rows = {name: (await session.execute(text(q))).all() for name, q in _QUERIES.items()}
    runs = GaugeMetricFamily("flywheel_runs", "Training runs by state", labels=["state"])
    for r in rows["runs"]:
        runs.add_metric([r.state], r.n)
    buffer = GaugeMetricFamily("flywheel_feedback_buffer", "New ratings since the alias's last run",
                               labels=["tenant", "alias"])
    threshold = GaugeMetricFamily("flywheel_feedback_threshold", "Ratings that trigger a retrain",
                                  labels=["tenant", "alias"])
    for r in rows["buffer"]:
        buffer.add_metric([r.tenant_id, r.alias], r.n)
        if (r.tenant_id, r.alias) in thresholds:
            threshold.add_metric([r.tenant_id, r.alias], thresholds[(r.tenant_id, r.alias)])
    seconds = GaugeMetricFamily("flywheel_training_seconds", "Duration of the alias's last training",
                                labels=["tenant", "alias"])
    tps = GaugeMetricFamily("flywheel_training_tokens_per_second", "Throughput of the last training",
                            labels=["tenant", "alias"])
    for r in rows["training"]:
        if r.seconds is not None:
            seconds.add_metric([r.tenant_id, r.alias], r.seconds)
        if r.tps is not None:
            tps.add_metric([r.tenant_id, r.alias], r.tps)
    verdicts = GaugeMetricFamily("flywheel_gate_verdicts", "Eval gate verdicts", labels=["verdict"])
    for r in rows["verdicts"]:
        verdicts.add_metric([r.v], r.n)
    swap = GaugeMetricFamily("flywheel_swap_seconds", "Wall time of the alias's last hot-swap",
                             labels=["tenant", "alias"])
    for r in rows["swap"]:
        swap.add_metric([r.tenant_id, r.alias], r.seconds)
    rollbacks = GaugeMetricFamily("flywheel_rollbacks", "Rollbacks", labels=["tenant", "kind"])
    for r in rows["rollbacks"]:
        rollbacks.add_metric([r.tenant_id, "automatic" if r.automatic else "manual"], r.n)
    exports = GaugeMetricFamily("flywheel_exports", "Edge exports by outcome",
                                labels=["tenant", "format", "quant", "status"])
    export_bytes = GaugeMetricFamily("flywheel_export_bytes", "Largest passed export's size",
                                     labels=["tenant", "format", "quant"])
    for r in rows["exports"]:
        exports.add_metric([r.tenant_id, r.format, r.quant, r.status], r.n)
        if r.bytes is not None:
            export_bytes.add_metric([r.tenant_id, r.format, r.quant], r.bytes)
    up = GaugeMetricFamily("flywheel_replica_up", "vLLM replica health as this API sees it",
                           labels=["replica"])
    for url, healthy in replicas:
        up.add_metric([url], 1 if healthy else 0)

    ratings = GaugeMetricFamily("flywheel_ratings", "Ratings by source (human: posted or "
                                "imported; judge: the AI judge) and rating",
                                labels=["tenant", "alias", "source", "rating"])
    for r in rows["feedback_by_source"]:
        ratings.add_metric([r.tenant_id, r.alias, r.source, r.rating], r.n)
    pairs = GaugeMetricFamily("flywheel_judge_agreement_pairs", "Answers both a human and the "
                              "AI judge rated (human, judge pairs)", labels=["tenant", "alias"])
    agree = GaugeMetricFamily("flywheel_judge_agreement_agree", "Of those pairs, how many agree",
                              labels=["tenant", "alias"])
    for r in rows["judge_agreement"]:
        pairs.add_metric([r.tenant_id, r.alias], r.pairs)
        agree.add_metric([r.tenant_id, r.alias], r.agree)
    skips = GaugeMetricFamily("flywheel_judge_skipped", "Answers the AI judge was asked about "
                              "and gave no usable verdict, by reason",
                              labels=["tenant", "alias", "reason"])
    for r in rows["judge_skips"]:
        skips.add_metric([r.tenant_id, r.alias, r.reason], r.n)

    registry = CollectorRegistry()
    families = [runs, buffer, threshold, seconds, tps, verdicts, swap, rollbacks, exports,
                export_bytes, up, ratings, pairs, agree, skips]

    class _Fixed:
        def collect(self):
            return families

    registry.register(_Fixed())
    return generate_latest(registry)
