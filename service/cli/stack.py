"""`flywheel up`, `flywheel demo` and `flywheel make-tiny-model`: the local stack and its demo
from the command line (the tooling itself is in service/local/)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from service.config import get_settings
from service.engine.managed import VllmStartError
from service.local.demo import Demo
from service.local.supervisor import Stack
from service.local.tiny_model import build_tiny_model
from service.models.inspect import ModelError

console = Console()


def up(port: Annotated[int | None, typer.Option(help="API port.")] = None) -> None:
    """API + worker + beat (+ embedded Postgres/Redis and a managed vLLM when not configured),
    in the foreground; Ctrl-C stops all of it."""
    settings = get_settings()
    stack = Stack(settings, api_port=port or settings.api_port,
                  log_dir=settings.data_dir.resolve() / "logs")
    stopping = False

    def _stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        stack.start(on_step=lambda m: console.print(f"[cyan]▸[/cyan] {m}"))
        console.print(f"[green]Flywheel is up[/green] at {stack.api_url} "
                      f"(logs in {stack.log_dir}); Ctrl-C to stop")
        while not stopping:
            dead = stack.dead_children()
            if dead:
                console.print(f"[red]{', '.join(dead)} exited[/red]; see {stack.log_dir}")
                raise typer.Exit(1)
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    except (ModelError, VllmStartError, RuntimeError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    finally:
        console.print("stopping...")
        stack.stop()


def demo(keep: Annotated[bool, typer.Option(help="Keep the previous demo's data.")] = False,
         export: Annotated[bool, typer.Option(help="Also export the promoted version as a GGUF "
                                                   "checked against the served one (minutes).")]
         = False) -> None:
    """The whole loop on the real default model (SmolLM2): embedded stack, a simulated product
    whose users rate and correct, retrain, gate, approval, hot-swap, before/after side by side.
    Exits 1 when the loop does not close or the new version is not better on held-out questions."""
    def _interrupt(*_):
        raise KeyboardInterrupt  # so `finally` stops every server the demo started

    signal.signal(signal.SIGTERM, _interrupt)
    runner = Demo(get_settings(), console, keep=keep, export=export)
    try:
        runner.run()
        console.print(runner.side_by_side())
        console.print(runner.summary())
        console.print(runner.timings())
        runner.verdict()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]; stopping what the demo started")
        raise typer.Exit(130) from None
    except (RuntimeError, ModelError, VllmStartError) as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    finally:
        runner.stop()


def make_tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the model into.")],
    seed: Annotated[int, typer.Option(help="Weight seed.")] = 0,
    pretrain_steps: Annotated[int, typer.Option(min=0, help="Brief pre-training so it emits words.")] = 0,
) -> None:
    """Build a tiny Llama-architecture model + tokenizer locally (no download) for demos and tests."""
    path = build_tiny_model(out_dir, seed=seed, pretrain_steps=pretrain_steps)
    console.print(f"tiny model ready at {path}")
