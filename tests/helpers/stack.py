"""Real servers for the test session: embedded Postgres + Redis, vLLM CPU, the API, a worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.local.embedded import free_port

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL_CACHE = Path.home() / ".cache" / "flywheel" / "tiny-model-v1"


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    """Poll url until it answers 200, or fail with the process log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-4000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was up:\n{tail}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    raise RuntimeError(f"{url} not up after {timeout}s:\n{tail}")


def stop_group(proc: subprocess.Popen | None, grace_s: float) -> None:
    """SIGTERM a child's process group (started with start_new_session), SIGKILL after grace_s."""
    if proc and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class ApiProcess:
    """`flywheel api` as a child process with its own environment."""

    env: dict[str, str]
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    workers: int = 1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ApiProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "api", "--port", str(self.port),
             "--workers", str(self.workers)],
            cwd=REPO, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_http(f"{self.url}/healthz", timeout, self.proc, self.log)
        return self

    def stop(self) -> None:
        stop_group(self.proc, 15)

    def __enter__(self) -> ApiProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def flywheel_env(**settings: str) -> dict[str, str]:
    """os.environ with FLYWHEEL_* replaced by the given settings (keys without the prefix)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update({f"FLYWHEEL_{k.upper()}": str(v) for k, v in settings.items()})
    return env


@contextmanager
def api_with(api_settings: dict[str, str], log: Path, **changes: str) -> Iterator[ApiProcess]:
    """`flywheel api` on the session's settings with `changes` (keys without the prefix), for
    a module that needs the API configured otherwise; stopped on exit."""
    with ApiProcess(env=flywheel_env(**{**api_settings, **changes}), log=log) as proc:
        yield proc


@dataclass
class WorkerProcess:
    """A real Celery worker (prefork, concurrency 1) on the training queue."""

    env: dict[str, str]
    log: Path
    name: str = "w1"
    proc: subprocess.Popen | None = None
    beat: bool = False  # run celery beat inside (sweeper, watch)

    def start(self) -> WorkerProcess:
        beat = ["--beat", "--schedule", str(self.log.with_suffix(".beat"))] if self.beat else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q",
             "training,default", "--concurrency", "1", "--prefetch-multiplier", "1",
             "--loglevel", "INFO", "-n", f"{self.name}-{os.getpid()}@%h", *beat],
            cwd=REPO, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def child_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill9(self) -> None:
        """SIGKILL the worker and its pool children at once, as a crash would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        stop_group(self.proc, 20)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
