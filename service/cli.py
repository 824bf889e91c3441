"""The `flywheel` command line (typer + rich)."""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from service.config import get_settings

app = typer.Typer(help="Flywheel: feedback-driven LoRA retraining behind an OpenAI-compatible API.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
keys_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)
adapters_app = typer.Typer(help="Adapter aliases and their versions.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(adapters_app, name="adapters")


def _register_ops_commands() -> None:
    # Kept in their own modules; registered here so `flywheel --help` lists them all.
    from service.cli_exports import export, exports_delete, exports_list
    from service.cli_imports import adapters_import, import_feedback, imports_list
    from service.cli_models import models_app
    from service.cli_runs import policies_app, runs_app, status
    from service.cli_stack import demo, up

    app.add_typer(runs_app, name="runs")
    app.add_typer(policies_app, name="policies")
    app.add_typer(models_app, name="models")
    app.command()(status)
    app.command()(up)
    app.command()(demo)
    app.command("export")(export)
    app.command("exports")(exports_list)
    app.command("export-delete")(exports_delete)
    app.command("import")(import_feedback)
    app.command("imports")(imports_list)
    adapters_app.command("import")(adapters_import)

console = Console()
err = Console(stderr=True)


class RoleChoice(str, enum.Enum):
    product = "product"
    ops = "ops"


def _sync_sessions():
    from sqlalchemy.orm import sessionmaker

    from service.db.session import make_sync_engine
    from service.embedded import resolve_database_url

    settings = get_settings()
    url = resolve_database_url(settings)
    return url, sessionmaker(make_sync_engine(url, connect_timeout_s=settings.db_connect_timeout_s))


def _require_migrated(url: str) -> None:
    from service.db import migrate
    from service.db.session import make_sync_engine

    try:
        migrate.check_migrated(make_sync_engine(url, pool_size=1), url)
    except migrate.NotMigrated as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


@app.command()
def migrate() -> None:
    """Apply database migrations (creates the embedded database when none is configured)."""
    from service.db import migrate as m
    from service.embedded import resolve_database_url

    url = resolve_database_url(get_settings())
    m.upgrade(url)
    console.print(f"database at revision [bold]{m.head_revision(url)}[/bold]")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to (created if new).")],
    role: Annotated[RoleChoice, typer.Option(help="product: chat, feedback, own interactions; "
                                                  "ops: everything in the tenant.")],
    name: Annotated[str, typer.Option(help="A label for listings.")] = "",
) -> None:
    """Create an API key and print it once; only its hash is stored."""
    from service.db import repositories as repo
    from service.db.session import session_scope
    from service.security import display_prefix, generate_key, hash_key

    from service.names import NameRefused, check_name

    try:
        check_name("tenant id", tenant)
    except NameRefused as exc:
        raise typer.BadParameter(str(exc), param_hint="--tenant") from exc
    url, sessions = _sync_sessions()
    _require_migrated(url)
    key = generate_key()
    with session_scope(sessions) as session:
        row = repo.create_api_key(session, tenant_id=tenant, role=role.value, key_hash=hash_key(key),
                                  prefix=display_prefix(key), name=name)
        repo.audit(session, tenant_id=tenant, actor="cli", action="key.create", target_type="api_key",
                   target_id=str(row.id), detail={"role": role.value, "prefix": row.prefix})
    err.print(f"created {role.value} key for tenant {tenant!r}; it is shown only once:")
    print(key)


@keys_app.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None) -> None:
    """List keys (prefix, tenant, role, state); never the keys themselves."""
    from service.db import repositories as repo
    from service.db.session import session_scope

    url, sessions = _sync_sessions()
    _require_migrated(url)
    table = Table("prefix", "tenant", "role", "name", "created", "revoked")
    table.add_column("id", no_wrap=True, min_width=36)
    with session_scope(sessions) as session:
        for k in repo.list_api_keys(session, tenant):
            table.add_row(k.prefix, k.tenant_id, k.role, k.name, f"{k.created_at:%Y-%m-%d %H:%M}",
                          f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "", str(k.id))
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="Key id or its displayed prefix.")]) -> None:
    """Revoke a key; requests with it fail within FLYWHEEL_AUTH_CACHE_TTL_S."""
    from service.db import repositories as repo
    from service.db.session import session_scope

    url, sessions = _sync_sessions()
    _require_migrated(url)
    with session_scope(sessions) as session:
        row = repo.revoke_api_key(session, key)
        if row is None:
            err.print(f"[red]error:[/red] no key with id or prefix {key!r}")
            raise typer.Exit(2)
        repo.audit(session, tenant_id=row.tenant_id, actor="cli", action="key.revoke",
                   target_type="api_key", target_id=str(row.id))
        summary = f"revoked {row.prefix} ({row.tenant_id}, {row.role})"
    console.print(summary)


@adapters_app.command("create")
def adapters_create(
    alias: Annotated[str, typer.Argument(help="The name products send as `model`.")],
    tenant: Annotated[str, typer.Option(help="Owning tenant.")],
    description: Annotated[str, typer.Option()] = "",
) -> None:
    """Register an alias; it serves the base model until a trained version is promoted."""
    import re

    from service.db import repositories as repo
    from service.db.session import session_scope

    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", alias) or "--" in alias:
        raise typer.BadParameter("use 1-63 chars of a-z, 0-9, '.', '_', '-', and no '--' (the "
                                 "separator of version names)", param_hint="ALIAS")
    url, sessions = _sync_sessions()
    _require_migrated(url)
    with session_scope(sessions) as session:
        adapter = repo.ensure_adapter(session, tenant, alias, description)
        repo.audit(session, tenant_id=tenant, actor="cli", action="adapter.create",
                   target_type="adapter", target_id=str(adapter.id))
    console.print(f"alias {alias!r} ready for tenant {tenant!r}")


def fresh_multiproc_dir(folder: Path) -> None:
    """Make PROMETHEUS_MULTIPROC_DIR and empty it, before any API process imports the metrics.

    prometheus_client writes each process's series to files there and fails on a missing folder;
    files a previous run left would add its counts to this one's. The folder belongs to one
    `flywheel api` (its processes share it), never to two.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Uvicorn worker processes.")] = 1,
) -> None:
    """Serve the API (gateway, feedback, runs, ops page) in the foreground."""
    import uvicorn

    settings = get_settings()
    url, _ = _sync_sessions()
    _require_migrated(url)
    if settings.prometheus_multiproc_dir is not None:
        fresh_multiproc_dir(settings.prometheus_multiproc_dir)
    uvicorn.run("service.api.app:create_app", factory=True, host=host or settings.api_host,
                port=port or settings.api_port, workers=workers, log_level="warning",
                access_log=False)


@app.command("make-tiny-model")
def make_tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the model into.")],
    seed: Annotated[int, typer.Option(help="Weight seed.")] = 0,
    pretrain_steps: Annotated[int, typer.Option(min=0, help="Brief pre-training so it emits words.")] = 0,
) -> None:
    """Build a tiny Llama-architecture model + tokenizer locally (no download) for demos and tests."""
    from service.tiny_model import build_tiny_model

    path = build_tiny_model(out_dir, seed=seed, pretrain_steps=pretrain_steps)
    console.print(f"tiny model ready at {path}")


@app.command()
def engine(
    port: Annotated[int | None, typer.Option(help="Port for the vLLM server.")] = None,
    host: Annotated[str, typer.Option(help="Bind address (keep it private: vLLM's LoRA "
                                           "endpoints have no auth).")] = "127.0.0.1",
) -> None:
    """Run a managed vLLM server on the base model (FLYWHEEL_BASE_MODEL, by default SmolLM2)."""
    import time

    from service.engine.managed import ManagedVllm
    from service.models.inspect import ModelError

    settings = get_settings()
    try:
        # die_with_parent: a killed `flywheel engine` must not leave its server behind.
        vllm = ManagedVllm.from_settings(settings, port=port or settings.vllm_port, host=host,
                                         die_with_parent=True,
                                         on_step=lambda m: console.print(f"[cyan]▸[/cyan] {m}"))
    except ModelError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    vllm.start()
    try:
        vllm.wait_healthy(timeout=300)
        console.print(f"vLLM serving {vllm.model_dir} (context {vllm.max_model_len} tokens) at "
                      f"{vllm.url} (Ctrl-C to stop)")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        vllm.stop()


def _engine_ops():
    """(sessions, replica URLs, SwapConfig) for the configured deployment."""
    from service.engine.swap import SwapConfig

    settings = get_settings()
    url, sessions = _sync_sessions()
    _require_migrated(url)
    if not settings.vllm_url_list:
        err.print("[red]error:[/red] set FLYWHEEL_VLLM_URLS to the vLLM replicas")
        raise typer.Exit(2)
    try:
        config = SwapConfig.from_settings(settings)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    return sessions, settings.vllm_url_list, config


def _adapter_id(sessions, tenant: str, alias: str):
    from sqlalchemy import select

    from service.db.models import Adapter
    from service.db.session import session_scope

    with session_scope(sessions) as session:
        adapter_id = session.scalar(select(Adapter.id).where(Adapter.tenant_id == tenant,
                                                             Adapter.alias == alias))
    if adapter_id is None:
        err.print(f"[red]error:[/red] no alias {alias!r} for tenant {tenant!r}")
        raise typer.Exit(2)
    return adapter_id


def _run_engine_op(op) -> None:
    """Run an async engine operation, print its result, exit 1 if it failed."""
    import asyncio
    import json

    from service.engine.swap import SwapError

    from service.engine.vllm_admin import replica_admins

    async def go():
        sessions, urls, config = _engine_ops()
        async with replica_admins(urls, timeout_s=30) as admins:
            return await op(sessions, admins, config)

    try:
        result = asyncio.run(go())
    except SwapError as exc:
        err.print(f"[red]refused:[/red] {exc}")
        raise typer.Exit(1) from exc
    print(json.dumps(result.as_dict(), indent=2, default=str))
    if not result.ok:
        err.print(f"[red]failed[/red] in {result.phase}: {result.code}: {result.reason}")
        raise typer.Exit(1)


@adapters_app.command("swap")
def adapters_swap(
    version: Annotated[str, typer.Argument(help="Adapter version id to make live.")],
    reason: Annotated[str | None, typer.Option(help="Recorded in the audit log.")] = None,
) -> None:
    """Verify, load and smoke a version on every replica, then flip its alias to it."""
    import uuid

    from service.engine.swap import swap

    _run_engine_op(lambda s, a, c: swap(s, a, uuid.UUID(version), c, actor="cli", reason=reason))


@adapters_app.command("rollback")
def adapters_rollback(
    alias: Annotated[str, typer.Argument(help="The alias to roll back.")],
    tenant: Annotated[str, typer.Option(help="Owning tenant.")],
    reason: Annotated[str | None, typer.Option(help="Recorded in the audit log.")] = None,
) -> None:
    """Serve the alias's previous version again (instant while it is warm)."""
    from service.engine.swap import rollback

    adapter_id = _adapter_id(_sync_sessions()[1], tenant, alias)
    _run_engine_op(lambda s, a, c: rollback(s, a, adapter_id, c, actor="cli", reason=reason))


@adapters_app.command("canary")
def adapters_canary(
    alias: Annotated[str, typer.Argument(help="The alias.")],
    tenant: Annotated[str, typer.Option(help="Owning tenant.")],
    version: Annotated[str | None, typer.Option(help="Version id; omit to clear.")] = None,
    share: Annotated[float, typer.Option(min=0.0, max=0.99, help="Share of traffic.")] = 0.1,
    reason: Annotated[str | None, typer.Option(help="Recorded in the audit log.")] = None,
) -> None:
    """Send a share of the alias's traffic (sticky per `user`) to a version, or clear the canary."""
    import uuid

    from service.engine.swap import set_canary

    adapter_id = _adapter_id(_sync_sessions()[1], tenant, alias)
    version_id = uuid.UUID(version) if version else None
    _run_engine_op(lambda s, a, c: set_canary(s, a, adapter_id, version_id,
                                              share if version else 0.0, c, actor="cli",
                                              reason=reason))


@app.command()
def reconcile() -> None:
    """Converge every replica to the desired state in the database once, and report."""
    import asyncio

    from service.engine.reconcile import reconcile_once, settings_verifier

    settings = get_settings()

    from service.engine.vllm_admin import replica_admins

    async def go():
        sessions, urls, _ = _engine_ops()
        async with replica_admins(urls, timeout_s=30) as admins:
            return await reconcile_once(sessions, admins, warm_grace_s=settings.warm_grace_s,
                                        drain_s=settings.drain_s,
                                        verify=settings_verifier(settings))

    report = asyncio.run(go())
    table = Table("replica", "healthy", "loaded", "loaded now", "unloaded now", "error")
    for r in report.replicas:
        table.add_row(r.url, str(r.healthy), str(len(r.loaded or ())), ", ".join(r.loaded_now),
                      ", ".join(r.unloaded_now), r.error or "")
    console.print(table)
    for e in report.errors:
        err.print(f"[yellow]warning:[/yellow] {e}")
    for name, why in sorted(report.refused.items()):
        err.print(f"[red]refused:[/red] {name}: {why}")
    if report.retired:
        console.print(f"retired: {', '.join(report.retired)}")
    if not report.converged:
        raise typer.Exit(1)


_register_ops_commands()


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="flywheel")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
