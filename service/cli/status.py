"""`flywheel status`: aliases with what they serve, runs by state, and the engines' health."""

from __future__ import annotations

import httpx
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from service.cli.db import migrated_sessions
from service.config import get_settings
from service.db.models import Adapter, AdapterVersion, TrainingRun
from service.engine.discovery import Discovery

console = Console()


def status() -> None:
    """Services, aliases with their serving versions, and runs by state."""
    settings = get_settings()
    sessions = migrated_sessions()
    table = Table("tenant", "alias", "serving", "canary", "versions")
    with sessions() as s:
        names = dict(s.execute(select(AdapterVersion.id, AdapterVersion.lora_name)).all())
        counts = dict(s.execute(select(AdapterVersion.adapter_id, func.count())
                                .group_by(AdapterVersion.adapter_id)).all())
        for a in s.scalars(select(Adapter).order_by(Adapter.tenant_id, Adapter.alias)):
            canary = f"{names.get(a.canary_version_id)} ({a.canary_share:.0%})" if a.canary_version_id else ""
            table.add_row(a.tenant_id, a.alias, names.get(a.serving_version_id, "base"), canary,
                          str(counts.get(a.id, 0)))
        by_state = dict(s.execute(select(TrainingRun.state, func.count())
                                  .group_by(TrainingRun.state)).all())
    console.print(table)
    console.print("runs: " + (", ".join(f"{k} {v}" for k, v in sorted(by_state.items())) or "none"))
    for url in Discovery(settings.vllm_url_list).urls:  # a name may resolve to many replicas
        try:
            ok = httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            ok = False
        console.print(f"engine {url}: {'[green]healthy[/green]' if ok else '[red]down[/red]'}")
