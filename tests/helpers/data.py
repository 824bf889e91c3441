"""Seeding rows straight into Postgres, for tests whose subject is what happens after a chat."""

from __future__ import annotations

import time
import uuid

from sqlalchemy import select

from service.db import repositories as repo
from service.db.models import Adapter, Interaction
from service.db.session import session_scope
from service.security import hash_key
from tests.helpers.auth import bearer


def api_key_id(db_sessions, key: str) -> uuid.UUID:
    """The id of an API key given in clear (to seed interactions as if sent with it)."""
    with db_sessions() as s:
        return next(k.id for k in repo.list_api_keys(s) if k.key_hash == hash_key(key))


def seed_interactions(db_sessions, tenant: str, alias: str, key_id: uuid.UUID | None,
                      n: int, *, prompt: str = "question {i}", answer: str = "answer {i}"
                      ) -> list[str]:
    """n interactions of an alias (served by base), as the gateway would have stored them."""
    ids = []
    with session_scope(db_sessions) as s:
        adapter = s.scalars(select(Adapter).where(Adapter.tenant_id == tenant,
                                                  Adapter.alias == alias)).one()
        for i in range(n):
            iid = uuid.uuid4()
            s.add(Interaction(id=iid, tenant_id=tenant, api_key_id=key_id, alias=alias,
                              adapter_id=adapter.id, served_model="base",
                              messages=[{"role": "user", "content": prompt.format(i=i)}],
                              params={}, response_text=answer.format(i=i), stream=False))
            ids.append(str(iid))
    return ids


def wait_import(client, alias: str, key: str, import_id: str, timeout: float = 60) -> dict:
    """Poll a feedback import through the API until it is no longer running (or time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/adapters/{alias}/imports/{import_id}",
                         headers=bearer(key)).json()
        if job["status"] != "running" or time.monotonic() > deadline:
            return job
        time.sleep(0.2)
