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

from service.config import get_settings

console = Console()
err = Console(stderr=True)

SourceChoice = enum.Enum("SourceChoice", {s: s for s in ("openwebui", "langfuse", "jsonl")}, type=str)
SHOWN_ERRORS = 20


def _adapter(session, tenant: str, alias: str):
    from sqlalchemy import select

    from service.db.models import Adapter

    adapter = session.scalars(select(Adapter).where(Adapter.tenant_id == tenant,
                                                    Adapter.alias == alias)).first()
    if adapter is None:
        err.print(f"[red]error:[/red] no alias {alias!r} for tenant {tenant!r} (create it with "
                  f"`flywheel adapters create {alias} --tenant {tenant}`)")
        raise typer.Exit(2)
    return adapter


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
    from service.cli_runs import _sessions
    from service.db.session import session_scope
    from service.embedded import resolve_broker_url
    from service.imports import FileRefused, RatingRule, parse_file, store
    from service.policy import PolicyStore
    from service.wakeup import wake_run

    try:
        rule = RatingRule(up_min=up_min, down_max=down_max, score_name=score_name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--up-min/--down-max") from exc
    try:
        parsed = parse_file(source.value, file.read_bytes(), rule)
    except FileRefused as exc:
        err.print(f"[red]error:[/red] {file}: {exc}")
        raise typer.Exit(2) from exc
    sessions = _sessions()
    if dry_run:
        with session_scope(sessions) as s:
            _adapter(s, tenant, alias)
            counts = store.dry_run(s, tenant, parsed)
        _report(counts, dry_run=True)
        console.print("dry run: nothing was written")
        raise typer.Exit(1 if counts["errors"] else 0)
    settings = get_settings()
    policy = PolicyStore(settings.policy_dir).for_alias(alias, tenant)
    with session_scope(sessions) as s:
        adapter = _adapter(s, tenant, alias)
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
    from service.cli_runs import _sessions
    from service.db.session import session_scope
    from service.imports import store

    sessions = _sessions()
    with session_scope(sessions) as s:
        adapter = _adapter(s, tenant, alias)
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
    from service.adapter_import import AdapterRefused, register
    from service.cli_runs import _sessions
    from service.db.session import session_scope
    from service.embedded import resolve_broker_url
    from service.policy import PolicyStore
    from service.wakeup import wake_run

    settings = get_settings()
    sessions = _sessions()
    try:
        with session_scope(sessions) as s:
            adapter = _adapter(s, tenant, alias)
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
