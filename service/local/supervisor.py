"""`flywheel up`: the whole stack in the foreground, stopped cleanly on Ctrl-C.

Services that are not configured are started here (embedded Postgres and Redis, a managed
vLLM), then the API, a Celery worker on the training queue and celery beat run as child
processes that are handed the resolved URLs, so none of them starts servers of its own.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.config import Settings
from service.db import migrate
from service.engine.managed import ManagedVllm
from service.local.embedded import ensure_postgres, ensure_redis, stop_postgres, stop_redis
from service.models.resolve import ensure_base_model

log = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.argv, env=env, stdout=self.log_path.open("ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None or not self.alive():
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass
class Stack:
    """Everything `flywheel up` runs; start() returns once the API answers."""

    settings: Settings
    api_port: int
    log_dir: Path
    children: list[Child] = field(default_factory=list)
    started_embedded: bool = False
    vllm: ManagedVllm | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self, *, on_step=lambda msg: None) -> Stack:
        s = self.settings
        # First: a model that cannot be served or trained stops here, before any server starts.
        model = ensure_base_model(s, on_step)
        model_path = model if isinstance(model, str) else str(model.path)
        db_url, broker_url = s.database_url, s.broker_url
        if not db_url or not broker_url:
            on_step("starting embedded Postgres and Redis")
            self.started_embedded = True
            db_url = db_url or ensure_postgres(s.embedded_dir)
            broker_url = broker_url or ensure_redis(s.embedded_dir).url
        on_step("migrating the database")
        migrate.upgrade(db_url)
        vllm_urls = s.vllm_urls
        if not vllm_urls:
            self.vllm = ManagedVllm.from_settings(s, model=model, log_path=self.log_dir / "vllm.log")
            on_step(f"starting a managed vLLM on {self.vllm.model_dir.name} "
                    f"(context {self.vllm.max_model_len} tokens; 20-60 s on CPU)")
            self.vllm.start()
            self.vllm.wait_healthy(timeout=300)
            vllm_urls = self.vllm.url
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
        # Children get this stack's settings, with every service URL resolved.
        for name, value in s.model_dump(exclude_none=True).items():
            if name != "prometheus_multiproc_dir":
                self.env[f"FLYWHEEL_{name.upper()}"] = (str(Path(value).resolve())
                                                        if isinstance(value, Path) else str(value))
        self.env.update({"FLYWHEEL_DATABASE_URL": db_url, "FLYWHEEL_BROKER_URL": broker_url,
                         "FLYWHEEL_VLLM_URLS": vllm_urls, "FLYWHEEL_BASE_MODEL": model_path})
        py = sys.executable
        self.children = [
            Child("api", [py, "-m", "service.cli", "api", "--port", str(self.api_port)],
                  self.log_dir / "api.log"),
            Child("worker", [py, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q",
                             "training,default", "--concurrency", "1", "--prefetch-multiplier", "1",
                             "--loglevel", "INFO", "-n", f"flywheel-{os.getpid()}@%h"],
                  self.log_dir / "worker.log"),
            Child("beat", [py, "-m", "celery", "-A", "workers.celery_app", "beat", "--loglevel",
                           "INFO", "--schedule", str(self.log_dir / "celerybeat-schedule")],
                  self.log_dir / "beat.log"),
        ]
        for child in self.children:
            on_step(f"starting {child.name}")
            child.start(self.env)
        self._wait_api()
        return self

    def _wait_api(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        api = self.children[0]
        while time.monotonic() < deadline:
            if not api.alive():
                raise RuntimeError(f"the API exited; see {api.log_path}:\n"
                                   f"{api.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.api_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the API did not answer within {timeout}s; see {api.log_path}")

    def dead_children(self) -> list[str]:
        return [c.name for c in self.children if not c.alive()]

    def stop(self) -> None:
        """Stop children in reverse order, then what this stack started."""
        for child in reversed(self.children):
            child.stop()
        if self.vllm is not None:
            self.vllm.stop()
        if self.started_embedded:
            stop_redis(self.settings.embedded_dir)
            stop_postgres(self.settings.embedded_dir)
