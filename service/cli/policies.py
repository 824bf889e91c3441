"""`flywheel policies`: validate the policy files, show the policy in effect for an alias."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console

from service.config import get_settings
from service.domain.policy import PolicyError, PolicyStore

policies_app = typer.Typer(help="Policy files.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


def _policy_store(policy_dir: Path) -> PolicyStore:
    """Every policy file loaded and validated; exit 1 naming the file, field and reason."""
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
    settings = get_settings()
    store = _policy_store(settings.policy_dir)
    sources = store.source_for(alias, tenant)
    console.print(f"# {alias}: {' + '.join(sources) if sources else 'built-in defaults'} "
                  f"(in {settings.policy_dir})", markup=False, highlight=False)
    policy = store.for_alias(alias, tenant).model_dump(mode="json")
    console.print(yaml.safe_dump(policy, sort_keys=False), markup=False, highlight=False)
