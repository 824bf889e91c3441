"""Tenant ids and aliases cannot contain the `--` of version and policy names, wherever they
are created: the API, the CLI, the repositories and the database itself."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from service.db import repositories as repo
from service.db.session import session_scope
from service.names import NameRefused
from tests.helpers.auth import bearer
from tests.helpers.cli import flywheel

pytestmark = pytest.mark.vllm


def test_the_api_refuses_an_alias_with_the_separator(client, make_key, tenant):
    ops = make_key(tenant, "ops")
    r = client.post("/v1/adapters", headers=bearer(ops), json={"alias": "b--c"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "alias"
    assert "separator" in r.json()["error"]["message"]
    assert client.post("/v1/adapters", headers=bearer(ops), json={"alias": "b-c"}).status_code == 201


def test_the_cli_and_the_repositories_refuse_it_too(cli_env, db_sessions, tenant):
    bad = flywheel(cli_env, "keys", "create", "--tenant", f"{tenant}--x", "--role", "ops")
    assert bad.returncode != 0 and "separator" in bad.stderr
    bad = flywheel(cli_env, "adapters", "create", "b--c", "--tenant", tenant)
    assert bad.returncode != 0 and "--" in bad.stderr
    with session_scope(db_sessions) as s, pytest.raises(NameRefused, match="alias 'x--y'"):
        repo.ensure_adapter(s, tenant, "x--y")
    with session_scope(db_sessions) as s, pytest.raises(NameRefused, match="tenant id"):
        repo.ensure_tenant(s, "p--q")


def test_the_database_refuses_new_rows_with_it(db_sessions, tenant):
    with pytest.raises(IntegrityError, match="ck_tenants_no_separator"):
        with session_scope(db_sessions) as s:
            s.execute(sa.text("INSERT INTO tenants (id, name) VALUES ('a--b', '')"))
    with session_scope(db_sessions) as s:
        adapter_id = repo.ensure_adapter(s, tenant, "b-c").id
    with pytest.raises(IntegrityError, match="ck_adapters_alias_no_separator"):
        with session_scope(db_sessions) as s:
            s.execute(sa.text("UPDATE adapters SET alias = 'b--c' WHERE id = :id"),
                      {"id": adapter_id})
