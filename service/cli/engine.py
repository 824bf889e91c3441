"""`flywheel engine` and `flywheel reconcile`, and the runner every engine operation of the CLI
shares (`flywheel adapters swap|rollback|canary`): the vLLM replicas from the command line."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.orm import sessionmaker

from service.cli.db import migrated_sessions
from service.config import get_settings
from service.domain.policy import PolicyStore
from service.engine.managed import ManagedVllm
from service.engine.reconcile import reconcile_once, settings_verifier
from service.engine.swap import SwapConfig, SwapError
from service.engine.vllm_admin import VllmAdmin, replica_admins_for
from service.models.inspect import ModelError

console = Console()
err = Console(stderr=True)

# How long one admin call may take from the CLI.
ADMIN_TIMEOUT_S = 30

EngineOp = Callable[[sessionmaker, list[VllmAdmin], SwapConfig], Awaitable[Any]]


def engine(
    port: Annotated[int | None, typer.Option(help="Port for the vLLM server.")] = None,
    host: Annotated[str, typer.Option(help="Bind address (keep it private: vLLM's LoRA "
                                           "endpoints have no auth).")] = "127.0.0.1",
) -> None:
    """Run a managed vLLM server on the base model (FLYWHEEL_BASE_MODEL, by default SmolLM2)."""
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


def _engine_ops() -> tuple[sessionmaker, SwapConfig]:
    """(sessions, SwapConfig) for the configured deployment; exit 2 without replicas."""
    settings = get_settings()
    factory = migrated_sessions()
    if not settings.vllm_url_list:
        err.print("[red]error:[/red] set FLYWHEEL_VLLM_URLS to the vLLM replicas")
        raise typer.Exit(2)
    try:
        config = SwapConfig.from_settings(settings)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    return factory, config


def run_engine_op(op: EngineOp) -> None:
    """Run an async engine operation on every replica, print its result, exit 1 if it failed."""
    async def go():
        factory, config = _engine_ops()
        async with replica_admins_for(get_settings(), timeout_s=ADMIN_TIMEOUT_S) as admins:
            return await op(factory, admins, config)

    try:
        result = asyncio.run(go())
    except SwapError as exc:
        err.print(f"[red]refused:[/red] {exc}")
        raise typer.Exit(1) from exc
    print(json.dumps(result.as_dict(), indent=2, default=str))
    if not result.ok:
        err.print(f"[red]failed[/red] in {result.phase}: {result.code}: {result.reason}")
        raise typer.Exit(1)


def reconcile() -> None:
    """Converge every replica to the desired state in the database once, and report."""
    settings = get_settings()

    async def go():
        factory, _ = _engine_ops()
        async with replica_admins_for(settings, timeout_s=ADMIN_TIMEOUT_S) as admins:
            return await reconcile_once(factory, admins, warm_grace_s=settings.warm_grace_s,
                                        drain_s=settings.drain_s,
                                        verify=settings_verifier(settings),
                                        bound_for=PolicyStore(settings.policy_dir)
                                        .max_resident_versions)

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
    if report.evicted:
        console.print(f"evicted (residency bound): {', '.join(report.evicted)}")
    if not report.converged:
        raise typer.Exit(1)
