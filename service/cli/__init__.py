"""The `flywheel` command line (typer + rich): one module per command group, assembled here.

`service.cli:app` is the console script (pyproject.toml); `python -m service.cli` runs the same
app. Every module reaches the database through service/cli/db.py.
"""

from __future__ import annotations

import typer

from service.cli import (
    adapters,
    engine,
    exports,
    imports,
    keys,
    models,
    policies,
    runs,
    serve,
    stack,
    status,
)

app = typer.Typer(help="Flywheel: feedback-driven LoRA retraining behind an OpenAI-compatible API.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

# Registration order is `flywheel --help`'s order: the commands, then the groups.
app.command()(serve.migrate)
app.command()(serve.api)
app.command("make-tiny-model")(stack.make_tiny_model)
app.command()(engine.engine)
app.command()(engine.reconcile)
app.command()(status.status)
app.command()(stack.up)
app.command()(stack.demo)
app.command("export")(exports.export)
app.command("exports")(exports.exports_list)
app.command("export-delete")(exports.exports_delete)
app.command("import")(imports.import_feedback)
app.command("imports")(imports.imports_list)
app.add_typer(keys.keys_app, name="keys")
app.add_typer(adapters.adapters_app, name="adapters")
app.add_typer(runs.runs_app, name="runs")
app.add_typer(policies.policies_app, name="policies")
app.add_typer(models.models_app, name="models")


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="flywheel")
