"""`flywheel keys`: create, list and revoke API keys (only a key's hash is stored)."""

from __future__ import annotations

import enum
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from service.cli.db import migrated_sessions
from service.db import repositories as repo
from service.db.session import session_scope
from service.names import NameRefused, check_name
from service.security import display_prefix, generate_key, hash_key

keys_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


class RoleChoice(str, enum.Enum):
    product = "product"
    ops = "ops"


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to (created if new).")],
    role: Annotated[RoleChoice, typer.Option(help="product: chat, feedback, own interactions; "
                                                  "ops: everything in the tenant.")],
    name: Annotated[str, typer.Option(help="A label for listings.")] = "",
) -> None:
    """Create an API key and print it once; only its hash is stored."""
    try:
        check_name("tenant id", tenant)
    except NameRefused as exc:
        raise typer.BadParameter(str(exc), param_hint="--tenant") from exc
    factory = migrated_sessions()
    key = generate_key()
    with session_scope(factory) as session:
        row = repo.create_api_key(session, tenant_id=tenant, role=role.value, key_hash=hash_key(key),
                                  prefix=display_prefix(key), name=name)
        repo.audit(session, tenant_id=tenant, actor="cli", action="key.create", target_type="api_key",
                   target_id=str(row.id), detail={"role": role.value, "prefix": row.prefix})
    err.print(f"created {role.value} key for tenant {tenant!r}; it is shown only once:")
    print(key)


@keys_app.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None) -> None:
    """List keys (prefix, tenant, role, state); never the keys themselves."""
    factory = migrated_sessions()
    table = Table("prefix", "tenant", "role", "name", "created", "revoked")
    table.add_column("id", no_wrap=True, min_width=36)
    with session_scope(factory) as session:
        for k in repo.list_api_keys(session, tenant):
            table.add_row(k.prefix, k.tenant_id, k.role, k.name, f"{k.created_at:%Y-%m-%d %H:%M}",
                          f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "", str(k.id))
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="Key id or its displayed prefix.")]) -> None:
    """Revoke a key; requests with it fail within FLYWHEEL_AUTH_CACHE_TTL_S."""
    factory = migrated_sessions()
    with session_scope(factory) as session:
        row = repo.revoke_api_key(session, key)
        if row is None:
            err.print(f"[red]error:[/red] no key with id or prefix {key!r}")
            raise typer.Exit(2)
        repo.audit(session, tenant_id=row.tenant_id, actor="cli", action="key.revoke",
                   target_type="api_key", target_id=str(row.id))
        summary = f"revoked {row.prefix} ({row.tenant_id}, {row.role})"
    console.print(summary)
