"""`flywheel runs`: list, show (and follow), approve and reject training runs."""

from __future__ import annotations

import time
import uuid
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy import select

from service.cli.db import migrated_sessions
from service.config import get_settings
from service.db.models import Adapter, TrainingRun
from service.db.session import session_scope
from service.domain.decisions import DecisionError, decide_run
from service.local.embedded import resolve_broker_url
from service.wakeup import wake_run

runs_app = typer.Typer(help="Training runs: list, show, approve, reject.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


def _run_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r} is not a run id (a UUID)", param_hint="RUN_ID") from exc


def _progress_text(progress: dict) -> str:
    if not progress or "step" not in progress:
        return ""
    loss = progress.get("loss")
    eta = progress.get("eta_s")
    return (f"{progress['step']}/{progress.get('total_steps', '?')}"
            + (f" loss {loss:.3f}" if isinstance(loss, (int, float)) else "")
            + (f" eta {eta:.0f}s" if isinstance(eta, (int, float)) else ""))


def _quantization_short(metrics: dict) -> str:
    """The list's word for a run's quantization ("" when it asked for none)."""
    q = (metrics or {}).get("quantization") or {}
    if not q or q.get("requested") in (None, "none"):
        return ""
    if q.get("fallback"):
        return "qlora -> LoRA fallback"
    return "qlora" if q.get("used") == "qlora" else "qlora unavailable"


def _quantization_text(metrics: dict) -> str:
    """What `runs show` says about the run's quantization: what was asked, used, and why."""
    q = (metrics or {}).get("quantization") or {}
    short = _quantization_short(metrics)
    return f"{short}: {q['reason']}" if short and q.get("reason") else short


@runs_app.command("list")
def runs_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    alias: Annotated[str | None, typer.Option(help="Only this alias.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
) -> None:
    """Recent runs with state and progress."""
    q = (select(TrainingRun, Adapter.alias).join(Adapter, Adapter.id == TrainingRun.adapter_id)
         .order_by(TrainingRun.created_at.desc()).limit(limit))
    if tenant:
        q = q.where(TrainingRun.tenant_id == tenant)
    if alias:
        q = q.where(Adapter.alias == alias)
    table = Table("tenant", "alias", "state", "method", "quant", "progress", "created")
    table.add_column("run", no_wrap=True, min_width=36)
    with migrated_sessions()() as s:
        for run, a in s.execute(q):
            table.add_row(run.tenant_id, a, run.state, run.method or "",
                          _quantization_short(run.metrics or {}), _progress_text(run.progress or {}),
                          f"{run.created_at:%Y-%m-%d %H:%M:%S}",
                          str(run.id))
    console.print(table)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="Show live training progress until the run settles.")] = False,
) -> None:
    """A run: state, dataset, training progress, gate metrics and verdict."""
    rid = _run_id(run_id)
    sessions = migrated_sessions()
    with sessions() as s:
        run = s.get(TrainingRun, rid)
    if run is None:
        err.print(f"[red]error:[/red] no run {run_id}")
        raise typer.Exit(2)
    if follow:
        _follow(sessions, rid)
        with sessions() as s:
            run = s.get(TrainingRun, rid)
    table = Table(show_header=False)
    for label, value in [("state", run.state), ("method", f"{run.method} ({run.method_reason})"),
                         ("quantization", _quantization_text(run.metrics or {})),
                         ("trigger", run.trigger), ("dataset", run.dataset_stats),
                         ("progress", _progress_text(run.progress or {})),
                         ("training job", _job_text(run.trainer_job)),
                         ("gate", (run.metrics or {}).get("gate")), ("verdict", run.verdict),
                         ("failure", run.failure_reason)]:
        if value:
            table.add_row(label, str(value))
    console.print(table)


def _job_text(job: dict | None) -> str | None:
    """Where the run's training job runs: the operator's view, directory and pid included."""
    if not job:
        return None
    restarts = job.get("restarts", 0)
    text = (f"{job.get('backend')} attempt {job.get('attempt')} (restarts {restarts}), "
            f"pid {job.get('pid')} on {job.get('host')}: {job.get('dir')}")
    if job.get("previous_end"):
        text += f"; the attempt before ended: {job['previous_end']}"
    return text


def _follow(sessions, rid: uuid.UUID) -> None:
    settled = {"awaiting_approval", "rejected", "failed", "live", "rolled_back", "superseded"}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[loss]}"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("pending", total=None, loss="")
        while True:
            with sessions() as s:
                run = s.get(TrainingRun, rid)
            p = run.progress or {}
            loss = p.get("loss")
            bar.update(task, description=run.state, total=p.get("total_steps"),
                       completed=p.get("step", 0),
                       loss=f"loss {loss:.3f}" if isinstance(loss, (int, float)) else "")
            if run.state in settled:
                return
            time.sleep(0.5)


def _decide(run_id: str, approve: bool, reason: str | None) -> None:
    rid = _run_id(run_id)
    try:
        with session_scope(migrated_sessions()) as s:
            run = decide_run(s, rid, approve=approve, actor="cli", reason=reason)
            tenant_id, state = run.tenant_id, run.state
    except DecisionError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2 if exc.status == 404 else 1) from exc
    if approve:
        wake_run(resolve_broker_url(get_settings()), rid)
    console.print(f"run {run_id} ({tenant_id}) is now [bold]{state}[/bold]")


@runs_app.command("approve")
def runs_approve(run_id: Annotated[str, typer.Argument(help="Run id.")],
                 reason: Annotated[str | None, typer.Option(help="Why (audited).")] = None) -> None:
    """Approve a run awaiting approval; a worker deploys it."""
    _decide(run_id, True, reason)


@runs_app.command("reject")
def runs_reject(run_id: Annotated[str, typer.Argument(help="Run id.")],
                reason: Annotated[str | None, typer.Option(help="Why (audited).")] = None) -> None:
    """Reject a run awaiting approval; the alias keeps its version."""
    _decide(run_id, False, reason)
