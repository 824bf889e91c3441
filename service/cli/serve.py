"""`flywheel migrate` and `flywheel api`: the database schema and the API server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import uvicorn
from rich.console import Console

from service.cli.db import database_url, require_migrated
from service.config import get_settings
from service.db import migrate as schema

console = Console()


def migrate() -> None:
    """Apply database migrations (creates the embedded database when none is configured)."""
    url = database_url()
    schema.upgrade(url)
    console.print(f"database at revision [bold]{schema.head_revision(url)}[/bold]")


def fresh_multiproc_dir(folder: Path) -> None:
    """Make PROMETHEUS_MULTIPROC_DIR and empty it, before any API process imports the metrics.

    prometheus_client writes each process's series to files there and fails on a missing folder;
    files a previous run left would add its counts to this one's. The folder belongs to one
    `flywheel api` (its processes share it), never to two. (The CLI never imports
    service.metrics itself: uvicorn imports the app, and so the metrics, after this.)
    """
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()


def api(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Uvicorn worker processes.")] = 1,
) -> None:
    """Serve the API (gateway, feedback, runs, ops page) in the foreground."""
    settings = get_settings()
    require_migrated(database_url())
    if settings.prometheus_multiproc_dir is not None:
        fresh_multiproc_dir(settings.prometheus_multiproc_dir)
    uvicorn.run("service.api.app:create_app", factory=True, host=host or settings.api_host,
                port=port or settings.api_port, workers=workers, log_level="warning",
                access_log=False)
