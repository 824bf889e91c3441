"""`flywheel adapters`: register an alias, move what it serves (swap, rollback, canary), and
import an adapter trained elsewhere as a new version."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from service.cli.db import adapter_or_exit, migrated_sessions
from service.cli.engine import run_engine_op
from service.config import get_settings
from service.db import repositories as repo
from service.db.session import session_scope
from service.domain.adapter_import import AdapterRefused, register
from service.domain.policy import PolicyStore
from service.engine.swap import rollback, set_canary, swap
from service.local.embedded import resolve_broker_url
from service.wakeup import wake_run

adapters_app = typer.Typer(help="Adapter aliases and their versions.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


def _adapter_id(tenant: str, alias: str) -> uuid.UUID:
    with session_scope(migrated_sessions()) as session:
        return adapter_or_exit(session, alias, tenant).id


@adapters_app.command("create")
def adapters_create(
    alias: Annotated[str, typer.Argument(help="The name products send as `model`.")],
    tenant: Annotated[str, typer.Option(help="Owning tenant.")],
    description: Annotated[str, typer.Option()] = "",
) -> None:
    """Register an alias; it serves the base model until a trained version is promoted."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", alias) or "--" in alias:
        raise typer.BadParameter("use 1-63 chars of a-z, 0-9, '.', '_', '-', and no '--' (the "
                                 "separator of version names)", param_hint="ALIAS")
    with session_scope(migrated_sessions()) as session:
        adapter = repo.ensure_adapter(session, tenant, alias, description)
        repo.audit(session, tenant_id=tenant, actor="cli", action="adapter.create",
                   target_type="adapter", target_id=str(adapter.id))
    console.print(f"alias {alias!r} ready for tenant {tenant!r}")


@adapters_app.command("swap")
def adapters_swap(
    version: Annotated[str, typer.Argument(help="Adapter version id to make live.")],
    reason: Annotated[str | None, typer.Option(help="Recorded in the audit log.")] = None,
) -> None:
    """Verify, load and smoke a version on every replica, then flip its alias to it."""
    run_engine_op(lambda s, a, c: swap(s, a, uuid.UUID(version), c, actor="cli", reason=reason))


@adapters_app.command("rollback")
def adapters_rollback(
    alias: Annotated[str, typer.Argument(help="The alias to roll back.")],
    tenant: Annotated[str, typer.Option(help="Owning tenant.")],
    reason: Annotated[str | None, typer.Option(help="Recorded in the audit log.")] = None,
) -> None:
    """Serve the alias's previous version again (instant while it is warm)."""
    adapter_id = _adapter_id(tenant, alias)
    run_engine_op(lambda s, a, c: rollback(s, a, adapter_id, c, actor="cli", reason=reason))


@adapters_app.command("canary")
def adapters_canary(
    alias: Annotated[str, typer.Argument(help="The alias.")],
    tenant: Annotated[str, typer.Option(help="Owning tenant.")],
    version: Annotated[str | None, typer.Option(help="Version id; omit to clear.")] = None,
    share: Annotated[float, typer.Option(min=0.0, max=0.99, help="Share of traffic.")] = 0.1,
    reason: Annotated[str | None, typer.Option(help="Recorded in the audit log.")] = None,
) -> None:
    """Send a share of the alias's traffic (sticky per `user`) to a version, or clear the canary."""
    adapter_id = _adapter_id(tenant, alias)
    version_id = uuid.UUID(version) if version else None
    run_engine_op(lambda s, a, c: set_canary(s, a, adapter_id, version_id,
                                             share if version else 0.0, c, actor="cli",
                                             reason=reason))


@adapters_app.command("import")
def adapters_import(
    alias: Annotated[str, typer.Argument(help="The alias the adapter becomes a version of.")],
    directory: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="A PEFT adapter "
                                              "directory: adapter_config.json + "
                                              "adapter_model.safetensors.")],
    tenant: Annotated[str, typer.Option(help="Owning tenant.")],
    note: Annotated[str | None, typer.Option(help="Where it comes from (recorded in lineage "
                                                  "and the audit log).")] = None,
    same_base: Annotated[bool, typer.Option("--same-base", help="The adapter names its base "
                                            "differently, but it is the model the engine "
                                            "serves (recorded).")] = False,
) -> None:
    """Register an adapter trained elsewhere as a new version of the alias; the worker gates it
    and the policy's approval decides, as for a version Flywheel trained.

    Exit 0 when registered (its run is queued), 2 when the adapter is refused (the reason names
    the file or field), 1 when the alias has a run in progress.
    """
    settings = get_settings()
    factory = migrated_sessions()
    try:
        with session_scope(factory) as s:
            adapter = adapter_or_exit(s, alias, tenant, create_hint=True)
            done = register(s, adapter, directory, artifact_dir=settings.resolved_artifact_dir,
                            engine_base=settings.resolved_base_model,
                            max_lora_rank=settings.vllm_max_lora_rank,
                            policy=PolicyStore(settings.policy_dir).for_alias(alias, tenant),
                            actor="cli", note=note, same_base=same_base,
                            received_as=str(directory.resolve()), verify_weights=True)
    except AdapterRefused as exc:
        err.print(f"[red]refused:[/red] {exc.reason} ({exc.code})")
        raise typer.Exit(1 if exc.code == "run_active" else 2) from exc
    wake_run(resolve_broker_url(settings), done.run_id)
    console.print(f"registered {done.lora_name} (sha256 {done.sha256[:12]}…, base: "
                  f"{done.base_check}); run {done.run_id} gates it")
    if done.ignored:
        console.print(f"not taken: {', '.join(done.ignored)}")
