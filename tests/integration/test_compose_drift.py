"""docker-compose.yml's Flywheel services, each started natively with its own command and
environment, come up and do their part: migrate migrates, models prepares (and is a no-op the
second time), the engine serves, the API chats and aggregates its processes' metrics, the worker
consumes every queue the app routes to (beat's sweep and watch too), beat sends, and every
healthcheck passes. Fast, no Docker: scripts/compose_test.sh runs the containers themselves.

Only two things differ from the containers: service hosts are this test's servers (its own
database and Redis, so its sweeper never touches other tests' runs), and beat's intervals are
1 s instead of 10-15 s, so the test does not wait for them.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from service.db import repositories as repo
from service.db.session import make_sync_engine, session_scope
from service.local.embedded import ensure_redis, stop_redis
from service.security import display_prefix, generate_key, hash_key
from service.wakeup import ADVANCE_RUN_TASK, TRAINING_QUEUE, producer
from tests.helpers.auth import bearer
from tests.helpers.compose import ROOT, NativeService, describe, flywheel_services, load
from tests.helpers.stack import stop_group, wait_http

pytestmark = pytest.mark.timeout(600)

COMPOSE = load()
SERVICES = flywheel_services(COMPOSE)


class Started:
    """A compose service's command running natively, in its own process group, logging to a file."""

    def __init__(self, native: NativeService, log: Path, **extra_env: str) -> None:
        self.native, self.log = native, log
        self.proc = subprocess.Popen(native.argv(), cwd=ROOT, env=native.env(**extra_env),
                                     stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            assert self.proc.poll() is None, f"{self.native.name} exited:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"{self.native.name}: no {pattern!r} in {timeout}s:\n{self.text()[-3000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        stop_group(self.proc, 30)


def run_once(native: NativeService, timeout: float = 300, **extra_env: str):
    return subprocess.run(native.argv(), cwd=ROOT, env=native.env(**extra_env), capture_output=True,
                          text=True, timeout=timeout)


def healthy(native: NativeService, timeout: float = 60) -> subprocess.CompletedProcess:
    argv = native.healthcheck()
    assert argv, f"{native.name} has no healthcheck"
    return subprocess.run(argv, cwd=ROOT, env=native.env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def fresh_db(db_url):
    """An empty database on the session's server: the compose `migrate` command migrates it."""
    name = f"compose_{uuid.uuid4().hex[:8]}"
    admin = make_url(db_url).set(drivername="postgresql", database="postgres")
    conninfo = admin.render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_url(db_url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose-redis")
    yield ensure_redis(root).url
    stop_redis(root)


@pytest.fixture(scope="module")
def layout(tmp_path_factory, tiny_model):
    """Local folders for the containers' paths; /models/base is the tiny model."""
    root = tmp_path_factory.mktemp("compose")
    (root / "models").mkdir()
    (root / "models" / "base").symlink_to(tiny_model)
    return root


def native(name: str, layout: Path, hosts: dict[str, str]) -> NativeService:
    # Each container has a /data (the image makes it) and a /tmp of its own; volumes are shared.
    own = layout / name
    paths = {"/models": layout / "models", "/artifacts": layout / "artifacts",
             "/app/policies": ROOT / "policies", "/data": own / "data", "/tmp": own / "tmp"}
    for folder in (own / "data", own / "tmp", layout / "artifacts"):
        folder.mkdir(parents=True, exist_ok=True)
    return NativeService(name, SERVICES[name], paths, hosts)


def test_compose_names_the_services_this_test_runs():
    assert set(SERVICES) == {"models", "migrate", "vllm", "api", "worker", "beat"}, (
        "a Flywheel service was added or removed: run it below too")


def test_models_prepares_the_default_model_once(smollm2, tmp_path):
    """`flywheel models prepare --output /models/base` with the compose environment; a second run
    (every `docker compose up`) is a no-op. It copies the machine's prepared SmolLM2 (the image
    converts the GGUF it carries instead, about a minute)."""
    svc = NativeService("models", SERVICES["models"], {"/models": tmp_path}, {})
    first = run_once(svc)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (tmp_path / "base" / "flywheel-model.json").is_file()
    t0 = time.monotonic()
    again = run_once(svc)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "ready" in again.stdout and "copying" not in again.stdout, again.stdout
    assert time.monotonic() - t0 < 30


def test_every_service_comes_up_and_does_its_part(fresh_db, own_redis, layout, request):
    migrate = native("migrate", layout, {"postgres": fresh_db})
    done = run_once(migrate)
    assert done.returncode == 0, f"{describe(migrate.argv())}:\n{done.stdout}{done.stderr}"
    assert "database at revision" in done.stdout

    engine = native("vllm", layout, {})
    started: list[Started] = []
    request.addfinalizer(lambda: [s.stop() for s in reversed(started)])
    engine_proc = Started(engine, layout / "engine.log")
    started.append(engine_proc)
    engine_url = f"http://127.0.0.1:{engine.port(8100)}"
    hosts = {"postgres": fresh_db, "redis": own_redis, "vllm": engine_url}

    api = native("api", layout, hosts)
    multiproc = Path(api.env()["PROMETHEUS_MULTIPROC_DIR"])
    assert not multiproc.exists()  # `flywheel api` must make it
    api_proc = Started(api, layout / "api.log")
    started.append(api_proc)
    api_url = f"http://127.0.0.1:{api.port(8000)}"
    wait_http(f"{api_url}/healthz", 90, api_proc.proc, api_proc.log)
    health = healthy(api)
    assert health.returncode == 0, health.stdout + health.stderr

    fast_beat = {"FLYWHEEL_SWEEP_INTERVAL_S": "1", "FLYWHEEL_WATCH_INTERVAL_S": "1"}
    worker = native("worker", layout, hosts)
    beat = native("beat", layout, hosts)
    worker_proc = Started(worker, layout / "worker.log", **fast_beat)
    beat_proc = Started(beat, layout / "beat.log", **fast_beat)
    started += [worker_proc, beat_proc]

    # The engine (vLLM on the tiny model) takes longest; the others start meanwhile.
    wait_http(f"{engine_url}/health", 240, engine_proc.proc, engine_proc.log)
    health = healthy(engine)
    assert health.returncode == 0, health.stdout + health.stderr

    # The API serves a chat through the compose engine, and /metrics adds up both processes.
    key = _product_key(fresh_db)
    deadline = time.monotonic() + 30  # each API process re-reads the replicas every second
    while (ready := httpx.get(f"{api_url}/readyz", timeout=30)).status_code != 200:
        assert time.monotonic() < deadline, ready.text
        time.sleep(0.5)
    chat = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    answered = 0
    while answered < 4:  # a few, so that both processes answer some
        r = httpx.post(f"{api_url}/v1/chat/completions", headers=bearer(key), json=chat,
                       timeout=120)
        if r.status_code == 503 and time.monotonic() < deadline:
            time.sleep(1)  # the process that took it has not seen the replica yet
            continue
        assert r.status_code == 200, r.text
        answered += 1
    pids = {m.group(1) for f in multiproc.glob("*.db") if (m := re.search(r"_(\d+)\.db$", f.name))}
    assert len(pids) == 2, f"expected the 2 API processes' files in {multiproc}: {pids}"
    token = api.env()["FLYWHEEL_METRICS_TOKEN"]
    metrics = httpx.get(f"{api_url}/metrics", headers=bearer(token), timeout=30)
    assert metrics.status_code == 200 and "flywheel_interactions_total" in metrics.text

    # The worker consumes every routed queue: a wake-up on the training queue, and beat's tasks.
    producer(own_redis).send_task(ADVANCE_RUN_TASK, args=[str(uuid.uuid4())],
                                  queue=TRAINING_QUEUE, retry=False)
    for task in (ADVANCE_RUN_TASK, "flywheel.sweep", "flywheel.watch"):
        worker_proc.wait_for(rf"Task {re.escape(task)}\[[^\]]+\] succeeded", 120)
    for svc in (worker, beat):
        health = healthy(svc)
        assert health.returncode == 0, f"{svc.name}: {describe(svc.healthcheck())}\n{health}"
    for s in started:
        assert s.proc.poll() is None, f"{s.native.name} exited:\n{s.text()[-3000:]}"

    # Beat's healthcheck means something: beat keeps its heartbeat fresh, and a stopped beat's
    # heartbeat goes stale and fails it.
    from workers.celery_app import BEAT_HEARTBEAT

    heartbeat = Path(beat.env()["FLYWHEEL_DATA_DIR"]) / BEAT_HEARTBEAT
    hour_ago = time.time() - 3600
    os.utime(heartbeat, (hour_ago, hour_ago))
    deadline = time.monotonic() + 30
    while heartbeat.stat().st_mtime == hour_ago:
        assert time.monotonic() < deadline, "beat did not touch its heartbeat again"
        time.sleep(0.2)
    assert healthy(beat).returncode == 0
    beat_proc.stop()
    os.utime(heartbeat, (hour_ago, hour_ago))
    assert healthy(beat).returncode != 0, "a stale heartbeat passed beat's healthcheck"


def _product_key(db_url: str) -> str:
    engine = make_sync_engine(db_url, pool_size=1)
    try:
        key = generate_key()
        with session_scope(sessionmaker(engine)) as s:
            repo.create_api_key(s, tenant_id=f"t-{uuid.uuid4().hex[:8]}", role="product",
                                key_hash=hash_key(key), prefix=display_prefix(key))
        return key
    finally:
        engine.dispose()
