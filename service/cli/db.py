"""The CLI's one way into the database: the URL, a session factory on a migrated schema, and
the alias lookup every command group shares (each exits with a message when it cannot go on)."""

from __future__ import annotations

import typer
from rich.console import Console
from sqlalchemy.orm import Session, sessionmaker

from service.config import get_settings
from service.db import migrate
from service.db import repositories as repo
from service.db.models import Adapter
from service.db.session import make_sync_engine
from service.local.embedded import resolve_database_url

err = Console(stderr=True)


def database_url() -> str:
    """The configured database URL, else the embedded Postgres's (started now if needed)."""
    return resolve_database_url(get_settings())


def require_migrated(url: str) -> None:
    """Exit 1 with the reason when the database is not at the code's migration head."""
    try:
        migrate.check_migrated(make_sync_engine(url, pool_size=1), url)
    except migrate.NotMigrated as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


def migrated_sessions() -> sessionmaker:
    """A sync session factory on the migrated database (exit 1 when it is not migrated)."""
    settings = get_settings()
    url = resolve_database_url(settings)
    factory = sessionmaker(make_sync_engine(url, connect_timeout_s=settings.db_connect_timeout_s))
    require_migrated(url)
    return factory


def adapter_or_exit(session: Session, alias: str, tenant: str | None, *,
                    create_hint: bool = False) -> Adapter:
    """The alias's adapter; without a tenant the alias must be unique across tenants (exit 2).

    create_hint: say how to create a missing alias."""
    found = repo.adapters_named(session, alias, tenant)
    if not found:
        hint = (f" (create it with `flywheel adapters create {alias} --tenant {tenant}`)"
                if create_hint else "")
        err.print(f"[red]error:[/red] no alias {alias!r}"
                  + (f" for tenant {tenant!r}" if tenant is not None else "") + hint)
        raise typer.Exit(2)
    if len(found) > 1:
        tenants = ", ".join(sorted(a.tenant_id for a in found))
        err.print(f"[red]error:[/red] alias {alias!r} exists for tenants {tenants}: pass --tenant")
        raise typer.Exit(2)
    return found[0]
