"""`flywheel runs ...`, `flywheel status`, `flywheel policies check`: what ops type."""

from __future__ import annotations

import time
import uuid
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy import func, select

from service.config import get_settings

runs_app = typer.Typer(help="Training runs: list, show, approve, reject.", no_args_is_help=True)
policies_app = typer.Typer(help="Policy files.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


def _sessions():
    from service.cli import _require_migrated, _sync_sessions

    url, sessions = _sync_sessions()
    _require_migrated(url)
    return sessions


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
    from service.db.models import Adapter, TrainingRun

    q = (select(TrainingRun, Adapter.alias).join(Adapter, Adapter.id == TrainingRun.adapter_id)
         .order_by(TrainingRun.created_at.desc()).limit(limit))
    if tenant:
        q = q.where(TrainingRun.tenant_id == tenant)
    if alias:
        q = q.where(Adapter.alias == alias)
    table = Table("tenant", "alias", "state", "method", "quant", "progress", "created")
    table.add_column("run", no_wrap=True, min_width=36)
    with _sessions()() as s:
        for run, a in s.execute(q):
            table.add_row(run.tenant_id, a, run.state, run.method or "",
                          _quantization_short(run.metrics or {}), _progress_text(run.progress or {}), f"{run.created_at:%Y-%m-%d %H:%M:%S}",
                          str(run.id))
    console.print(table)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Show live training progress until the run settles.")] = False,
) -> None:
    """A run: state, dataset, training progress, gate metrics and verdict."""
    from service.db.models import TrainingRun

    rid = _run_id(run_id)
    sessions = _sessions()
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
                         ("gate", (run.metrics or {}).get("gate")), ("verdict", run.verdict),
                         ("failure", run.failure_reason)]:
        if value:
            table.add_row(label, str(value))
    console.print(table)


def _follow(sessions, rid: uuid.UUID) -> None:
    from service.db.models import TrainingRun

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
    from service.db.session import session_scope
    from service.decisions import DecisionError, decide_run

    rid = _run_id(run_id)
    try:
        with session_scope(_sessions()) as s:
            run = decide_run(s, rid, approve=approve, actor="cli", reason=reason)
            tenant_id, state = run.tenant_id, run.state
    except DecisionError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2 if exc.status == 404 else 1) from exc
    if approve:
        from service.embedded import resolve_broker_url
        from service.wakeup import wake_run

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


def status() -> None:
    """Services, aliases with their serving versions, and runs by state."""
    from service.db.models import Adapter, AdapterVersion, TrainingRun

    settings = get_settings()
    sessions = _sessions()
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
    import httpx

    for url in settings.vllm_url_list:
        try:
            ok = httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            ok = False
        console.print(f"engine {url}: {'[green]healthy[/green]' if ok else '[red]down[/red]'}")


def _policy_store(policy_dir):
    """Every policy file loaded and validated; exit 1 naming the file, field and reason."""
    from service.policy import PolicyError, PolicyStore

    try:
        return PolicyStore(policy_dir)
    except PolicyError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


@policies_app.command("check")
def policies_check() -> None:
    """Validate every policy file; exit 1 naming the file, field and reason of the first bad one."""
    settings = get_settings()
    store = _policy_store(settings.policy_dir)
    names = sorted(p.stem for p in settings.policy_dir.glob("*.yaml"))
    console.print(f"{len(names)} policy file(s) valid in {settings.policy_dir}: {', '.join(names)}")
    console.print(f"default approval: {store.for_alias('*').approval}")


@policies_app.command("show")
def policies_show(
    alias: Annotated[str, typer.Argument(help="the alias whose policy to show")],
    tenant: Annotated[str | None, typer.Option(help="tenant, for a <tenant>--<alias>.yaml")] = None,
) -> None:
    """Print the policy in effect for an alias (YAML) and the files merged into it."""
    import yaml

    settings = get_settings()
    store = _policy_store(settings.policy_dir)
    sources = store.source_for(alias, tenant)
    console.print(f"# {alias}: {' + '.join(sources) if sources else 'built-in defaults'} "
                  f"(in {settings.policy_dir})", markup=False, highlight=False)
    policy = store.for_alias(alias, tenant).model_dump(mode="json")
    console.print(yaml.safe_dump(policy, sort_keys=False), markup=False, highlight=False)
