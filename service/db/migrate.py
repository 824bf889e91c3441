"""Run and check Alembic migrations programmatically (`flywheel migrate`, API start-up check)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Alembic's config is an INI parser: escape % in URLs.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to revision."""
    command.upgrade(alembic_config(url), revision)


def head_revision(url: str) -> str:
    """The newest migration's revision id."""
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


class NotMigrated(RuntimeError):
    """The database schema is not at the code's head revision."""


def check_migrated(engine: Engine, url: str) -> None:
    """Raise NotMigrated with an actionable message unless the DB is at head."""
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    head = head_revision(url)
    if current != head:
        raise NotMigrated(
            f"database schema is at revision {current or 'none'} but this Flywheel needs {head}: "
            "run `flywheel migrate` first"
        )
