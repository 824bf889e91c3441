"""`flywheel import` and `flywheel imports`: ratings collected elsewhere, into an alias's buffer.

Same domain functions as the API (service.imports): the file is read and checked record by
record, then written in this process with a progress bar; the job row records the counts.
"""

from __future__ import annotations

import enum
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from service.cli.db import adapter_or_exit, migrated_sessions
from service.config import get_settings
from service.db.session import session_scope
from service.domain.policy import PolicyStore
from service.imports import FileRefused, RatingRule, parse_file, store
from service.local.embedded import resolve_broker_url
from service.wakeup import wake_run

console = Console()
err = Console(stderr=True)


class SourceChoice(str, enum.Enum):
    """The import formats (service.imports.SOURCES), as the enum Typer needs."""

    openwebui = "openwebui"
    langfuse = "langfuse"
    jsonl = "jsonl"


SHOWN_ERRORS = 20


def _report(counts: dict, *, dry_run: bool) -> None:
    verb = "would import" if dry_run else "imported"
    skipped = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in
                        sorted(counts.get("skipped_reasons", {}).items())) or "none"
    console.print(f"{counts['total']} records: {verb} {counts['imported']}, skipped "
                  f"{counts['skipped']} ({skipped}), malformed {counts['errors']}")
    samples = counts.get("error_samples", [])
    for e in samples[:SHOWN_ERRORS]:
        err.print(f"[yellow]{e['where']}:[/yellow] {e['reason']}")
    if counts["errors"] > SHOWN_ERRORS:
        err.print(f"... and {counts['errors'] - SHOWN_ERRORS} more malformed records")


def import_feedback(
    source: Annotated[SourceChoice, typer.Argument(help="openwebui (feedback export JSON), "
                                                        "langfuse (traces with scores), jsonl "
                                                        "(OpenAI chat messages + rating).")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True,
                                         help="The export file.")],
    alias: Annotated[str, typer.Option(help="The alias whose feedback buffer it goes into.")],
    tenant: Annotated[str, typer.Option(help="Owning tenant.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check every record and report what "
                                                            "would happen; write nothing.")] = False,
    score_name: Annotated[str, typer.Option(help="Langfuse: the score holding the rating.")]
    = "user-feedback",
    up_min: Annotated[float, typer.Option(help="A numeric rating at or above this is a "
                                               "thumbs-up.")] = 1.0,
    down_max: Annotated[float, typer.Option(help="A numeric rating at or below this is a "
                                                 "thumbs-down (between the two: skipped).")] = 0.0,
) -> None:
    """Import ratings collected elsewhere into an alias's feedback buffer.

    Records imported before are skipped (by their id at the source); a malformed record is
    reported with its line or index and skipped; the rest count toward the alias's trigger like
    live feedback. Exit 0 when every record was imported or skipped, 1 when some were malformed
    (the others are imported), 2 when the file or the arguments cannot be used.
    """
    try:
        rule = RatingRule(up_min=up_min, down_max=down_max, score_name=score_name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--up-min/--down-max") from exc
    try:
        parsed = parse_file(source.value, file.read_bytes(), rule)
    except FileRefused as exc:
        err.print(f"[red]error:[/red] {file}: {exc}")
        raise typer.Exit(2) from exc
    sessions = migrated_sessions()
    if dry_run:
        with session_scope(sessions) as s:
            adapter_or_exit(s, alias, tenant, create_hint=True)
            counts = store.dry_run(s, tenant, parsed)
        _report(counts, dry_run=True)
        console.print("dry run: nothing was written")
        raise typer.Exit(1 if counts["errors"] else 0)
    settings = get_settings()
    policy = PolicyStore(settings.policy_dir).for_alias(alias, tenant)
    with session_scope(sessions) as s:
        adapter = adapter_or_exit(s, alias, tenant, create_hint=True)
        job_id = store.create_job(s, adapter, parsed, actor="cli", rule=rule,
                                  file_name=file.name).id
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(f"importing {file.name}", total=len(parsed.items))
        job = store.run_job(sessions, job_id, parsed, policy,
                            on_progress=lambda done, _: bar.update(task, completed=done))
    _report({"total": job.total, "imported": job.imported, "skipped": job.skipped,
             "errors": job.errors, "skipped_reasons": job.skipped_reasons,
             "error_samples": job.error_samples}, dry_run=False)
    console.print(f"import {job.id}: {job.status}")
    if job.status != "done":
        err.print(f"[red]failed:[/red] {job.failure_reason}")
        raise typer.Exit(1)
    if job.run_id is not None:
        wake_run(resolve_broker_url(settings), job.run_id)
        console.print(f"the imported ratings crossed the trigger of {alias!r}: run {job.run_id}")
    raise typer.Exit(1 if job.errors else 0)


def imports_list(
    alias: Annotated[str, typer.Argument(help="The alias.")],
    tenant: Annotated[str, typer.Option(help="Owning tenant.")],
    import_id: Annotated[str | None, typer.Option("--id", help="Show one import with its "
                                                               "malformed records.")] = None,
) -> None:
    """An alias's feedback imports: source, status, counts (newest first)."""
    sessions = migrated_sessions()
    with session_scope(sessions) as s:
        adapter = adapter_or_exit(s, alias, tenant, create_hint=True)
        if import_id is not None:
            try:
                job = store.get_job(s, adapter.id, uuid.UUID(import_id))
            except ValueError as exc:
                raise typer.BadParameter(f"{import_id!r} is not an import id",
                                         param_hint="--id") from exc
            if job is None:
                err.print(f"[red]error:[/red] no import {import_id} for {alias!r}")
                raise typer.Exit(2)
            console.print(f"import {job.id} ({job.source}, {job.file_name or 'unnamed file'}, "
                          f"sha256 {job.file_sha256}): {job.status}")
            _report({"total": job.total, "imported": job.imported, "skipped": job.skipped,
                     "errors": job.errors, "skipped_reasons": job.skipped_reasons,
                     "error_samples": job.error_samples}, dry_run=False)
            if job.failure_reason:
                err.print(f"[red]{job.failure_reason}[/red]")
            return
        table = Table("created", "source", "file", "status", "total", "imported", "skipped",
                      "malformed", "run")
        table.add_column("id", no_wrap=True, min_width=36)
        for j in store.list_jobs(s, adapter.id):
            table.add_row(f"{j.created_at:%Y-%m-%d %H:%M}", j.source, j.file_name or "", j.status,
                          str(j.total), str(j.imported), str(j.skipped), str(j.errors),
                          str(j.run_id or ""), str(j.id))
    console.print(table)
