"""Prometheus metrics shared by API and workers.

Set PROMETHEUS_MULTIPROC_DIR (prometheus_client's own variable) when several processes serve, and
/metrics aggregates them.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client import REGISTRY as DEFAULT_REGISTRY

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

HTTP_REQUESTS = Counter(
    "flywheel_http_requests_total", "HTTP requests by route, method and status",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "flywheel_http_request_seconds", "HTTP request latency by route", ["route"],
    buckets=LATENCY_BUCKETS,
)
GATEWAY_LATENCY = Histogram(
    "flywheel_gateway_latency_seconds", "Chat completion latency by alias and version",
    ["alias", "version"], buckets=LATENCY_BUCKETS,
)
GATEWAY_TTFT = Histogram(
    "flywheel_gateway_ttft_seconds", "Time to first token of streamed completions",
    ["alias", "version"], buckets=LATENCY_BUCKETS,
)
INTERACTIONS = Counter("flywheel_interactions_total", "Interactions stored", ["alias"])
FEEDBACK = Counter("flywheel_feedback_total", "Feedback received", ["alias", "rating"])
FEEDBACK_BATCH = Histogram(
    "flywheel_feedback_batch_size", "Ratings written per statement (group commit)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
STORAGE_FAILURES = Counter(
    "flywheel_storage_failures_total",
    "Writes Postgres could not take (kind: interaction, response, feedback); spooled if it could",
    ["kind"],
)
SPOOLED = Counter("flywheel_spooled_total", "Records written to the local spool", ["kind"])
SPOOL_REPLAYED = Counter(
    "flywheel_spool_replayed_total", "Spooled records written back to Postgres", ["kind"],
)
SPOOL_REJECTED = Counter(
    "flywheel_spool_rejected_total",
    "Spooled records Postgres refused on replay, set aside in the spool's rejected/ folder",
    ["kind"],
)
SPOOL_FULL = Counter(
    "flywheel_spool_refusals_total", "Writes neither Postgres nor the spool could take (503)",
    ["kind"],
)
UPSTREAM_ERRORS = Counter(
    "flywheel_upstream_errors_total", "Failed calls to vLLM replicas", ["replica", "kind"],
)
SCRAPE_DB_FAILURES = Counter(
    "flywheel_metrics_db_failures_total", "Scrapes that could not read the loop's state from Postgres",
)


def render(multiprocess_mode: bool = False) -> tuple[bytes, str]:
    """Metrics exposition for this process, or for all processes in multiprocess mode."""
    if multiprocess_mode:

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(DEFAULT_REGISTRY), CONTENT_TYPE_LATEST
