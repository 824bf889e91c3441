"""Alembic environment: the URL comes from the caller (service.db.migrate), never from a file."""

from alembic import context
from sqlalchemy import create_engine, pool

from service.db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            # Several processes may run `flywheel migrate` at once (compose, tests): serialise them.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7042025)")
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
