"""Postgres schema, sessions and repositories. Postgres owns all of Flywheel's state."""
