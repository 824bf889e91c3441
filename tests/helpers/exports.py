"""A version to hang export jobs on, for the tests of the export queue.

A pytest plugin (tests/conftest.py registers it): the `version_id` fixture."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import select, text

from service.db import repositories as repo
from service.db.models import Adapter
from service.db.session import session_scope


@pytest.fixture()
def version_id(db_sessions, make_alias, tenant) -> Iterator[uuid.UUID]:
    """A version of a fresh alias with no artifact (the queue never reads it); at teardown its
    unsettled export jobs are settled, so no later module's sweeper finds them."""
    alias = make_alias(tenant)
    with session_scope(db_sessions) as s:
        adapter = s.scalars(select(Adapter).where(Adapter.tenant_id == tenant,
                                                  Adapter.alias == alias)).one()
        vid = repo.create_version(s, adapter, artifact_path="/nowhere", sha256="0" * 64,
                                  parent_version_id=None, run_id=None, lineage={}).id
    yield vid
    with session_scope(db_sessions) as s:  # leave no job for a later module's sweeper
        s.execute(text("UPDATE exports SET status = 'error' WHERE version_id = :v "
                       "AND status IN ('queued', 'running')"), {"v": vid})
