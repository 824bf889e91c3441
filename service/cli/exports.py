"""`flywheel export` and `flywheel exports`: edge exports from the command line.

Same domain functions as the API (service.domain.exports): the request is a row in Postgres and a
worker builds it; --wait follows its progress until it settles.
"""

from __future__ import annotations

import enum
import time
import uuid
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy import select

from service.cli.db import adapter_or_exit, migrated_sessions
from service.config import get_settings
from service.db.models import AdapterVersion, Export
from service.db.session import session_scope
from service.domain.exports import (
    ExportRefused,
    delete_export,
    remove_files,
    request_export,
    resolve_version,
)
from service.domain.policy import EXPORT_FORMATS, EXPORT_QUANTS, PolicyStore
from service.local.embedded import resolve_broker_url
from service.wakeup import wake_export

console = Console()
err = Console(stderr=True)


# Typer needs enums; these are the policy's choices (least aggressive quantization first).
# mypy reads members only from a literal, and these follow the policy's tuples instead.
FormatChoice = enum.Enum("FormatChoice", {f: f for f in EXPORT_FORMATS}, type=str)  # type: ignore[misc]
QuantChoice = enum.Enum("QuantChoice", {q: q for q in reversed(EXPORT_QUANTS)}, type=str)  # type: ignore[misc]


def export(
    alias: Annotated[str, typer.Argument(help="The alias whose version to export.")],
    format: Annotated[FormatChoice, typer.Option("--format", help="merged (safetensors) or gguf.")],
    quant: Annotated[QuantChoice | None, typer.Option(help="GGUF quantization.")] = None,
    version: Annotated[int | None, typer.Option(min=1, help="Version number (default: serving).")] = None,
    fallback: Annotated[bool | None, typer.Option(
        "--fallback/--no-fallback",
        help="On a failed gate try a less aggressive quant (default: the policy's).")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow progress to the end.")] = False,
    reason: Annotated[str | None, typer.Option(help="Recorded in the audit log.")] = None,
    tenant: Annotated[str | None, typer.Option(help="Owning tenant (needed when the alias name "
                                                    "exists in several).")] = None,
) -> None:
    """Export a version as a merged model or a GGUF, behind the consistency gate.

    Exit 0 when queued (or, with --wait, passed); 1 when the export failed or errored;
    2 for bad arguments.
    """
    settings = get_settings()
    sessions = migrated_sessions()
    try:
        with session_scope(sessions) as s:
            adapter = adapter_or_exit(s, alias, tenant or None)
            if fallback is None:
                fallback = PolicyStore(settings.policy_dir).for_alias(
                    alias, adapter.tenant_id).export.fallback
            target = resolve_version(s, adapter, version)
            row, created = request_export(s, target, fmt=format.value,
                                          quant=quant.value if quant else None,
                                          fallback=fallback, actor="cli", reason=reason)
            export_id, lora_name = row.id, target.lora_name
    except ExportRefused as exc:
        err.print(f"[red]error:[/red] {exc.param + ': ' if exc.param else ''}{exc.reason}")
        raise typer.Exit(2) from exc
    if created:
        wake_export(resolve_broker_url(settings), export_id)
    console.print(f"export {export_id} of {lora_name}: "
                  f"{'queued' if created else 'already ' + row.status + ' (same request)'}")
    if wait:
        _follow(sessions, export_id)
    _show(sessions, export_id, exit_on_failure=wait)


def _follow(sessions, export_id: uuid.UUID) -> None:
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TimeRemainingColumn(),
                  console=console) as bar:
        task = bar.add_task("queued", total=1.0)
        while True:
            with sessions() as s:
                row = s.get(Export, export_id)
            p = row.progress or {}
            bar.update(task, description=f"{row.status}: {p.get('stage', '')}"[:60],
                       completed=p.get("fraction", 0.0))
            if row.status not in ("queued", "running"):
                bar.update(task, completed=1.0)
                return
            time.sleep(0.5)


def _show(sessions, export_id: uuid.UUID, *, exit_on_failure: bool) -> None:
    with sessions() as s:
        row = s.get(Export, export_id)
    table = Table(show_header=False)
    for label, value in [("status", row.status), ("format", row.format),
                         ("quant", row.quant if row.quant == row.requested_quant
                          else f"{row.quant} (asked {row.requested_quant})"),
                         ("sha256", row.sha256), ("bytes", row.bytes), ("path", row.path),
                         ("failure", row.failure_reason), ("suggestion", row.suggestion)]:
        if value:
            table.add_row(label, str(value))
    for attempt in (row.metrics or {}).get("attempts", []):
        m = attempt.get("metrics") or {}
        if m:
            table.add_row(f"gate {attempt['format']}{'/' + attempt['quant'] if attempt['quant'] else ''}",
                          f"{attempt['status']}: agreement {m.get('decisive_agreement', 0):.3f}, "
                          f"NLL delta {m.get('nll_delta', 0):+.4f}, exact {m.get('exact_match', 0):.2f}")
    for f in row.files or []:
        table.add_row(f"file {f['name']}", f"{f['bytes']} bytes sha256 {f['sha256']}")
    console.print(table)
    if exit_on_failure and row.status in ("failed", "error"):
        raise typer.Exit(1)


def exports_list(
    alias: Annotated[str, typer.Argument(help="The alias.")],
    tenant: Annotated[str | None, typer.Option(help="Owning tenant (needed when the alias name "
                                                    "exists in several).")] = None,
) -> None:
    """An alias's exports, newest first."""
    table = Table("export", "version", "format", "quant", "status", "progress", "sha256", "bytes",
                  "created")
    with migrated_sessions()() as s:
        adapter = adapter_or_exit(s, alias, tenant or None)
        rows = s.execute(select(Export, AdapterVersion.number)
                         .join(AdapterVersion, AdapterVersion.id == Export.version_id)
                         .where(Export.adapter_id == adapter.id)
                         .order_by(Export.created_at.desc()).limit(50))
        for e, number in rows:
            p = e.progress or {}
            progress = (f"{p.get('fraction', 0):.0%} {p.get('stage', '')}"
                        if e.status == "running" else "")
            table.add_row(str(e.id), str(number), e.format, e.quant or "", e.status, progress,
                          (e.sha256 or "")[:12], str(e.bytes or ""),
                          f"{e.created_at:%Y-%m-%d %H:%M:%S}")
    console.print(table)


def exports_delete(
    export_id: Annotated[str, typer.Argument(help="Export id.")],
    reason: Annotated[str | None, typer.Option(help="Recorded in the audit log.")] = None,
) -> None:
    """Delete a settled export's files (the record stays, marked deleted)."""
    try:
        eid = uuid.UUID(export_id)
    except ValueError as exc:
        raise typer.BadParameter(f"{export_id!r} is not an export id (a UUID)",
                                 param_hint="EXPORT_ID") from exc
    try:
        with session_scope(migrated_sessions()) as s:
            row = s.get(Export, eid)
            if row is None:
                err.print(f"[red]error:[/red] no export {export_id}")
                raise typer.Exit(2)
            freed = row.bytes or 0
            doomed = delete_export(s, row, actor="cli", reason=reason)
    except ExportRefused as exc:
        err.print(f"[red]error:[/red] {exc.reason}")
        raise typer.Exit(1) from exc
    remove_files(doomed)
    console.print(f"export {export_id} deleted ({freed} bytes freed)")
