"""Start, watch and stop a local vLLM OpenAI server as a child process group.

Used for local runs and tests (vLLM's CPU build here, the GPU build elsewhere). vLLM starts an
engine-core process (and, in some setups, workers) under the API server, so the server gets its
own process group and is stopped or killed as a whole.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx

from service.models.resolve import context_len, ensure_base_model


class VllmStartError(RuntimeError):
    """The server died or did not become healthy in time; the message carries the log tail."""


class ManagedVllm:
    """One vLLM OpenAI-compatible server with runtime LoRA loading enabled."""

    def __init__(
        self,
        model_dir: str | Path,
        port: int,
        *,
        served_model_name: str = "base",
        max_loras: int = 4,
        max_cpu_loras: int = 8,
        max_lora_rank: int = 16,
        max_model_len: int = 256,
        kv_cache_gb: float | None = 1,
        max_num_seqs: int | None = None,
        dtype: str = "bfloat16",
        enforce_eager: bool = True,
        log_path: str | Path | None = None,
        host: str = "127.0.0.1",
        python: str | None = None,
        die_with_parent: bool = False,
        cpu_threads: int | None = None,
        extra_args: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        """Configure (not start) a server for ``model_dir`` on ``host:port``.

        ``kv_cache_gb`` may be fractional (the tiny model needs ~64 MiB); None leaves the KV
        cache to vLLM's own sizing (a GPU's memory utilisation). ``cpu_threads`` caps the
        engine's compute threads on a CPU build (None: all cores but one, so the API, the
        database and the trainer keep a core). ``die_with_parent`` asks Linux to SIGTERM the
        server when the thread that called start() exits, so a crashed test run leaves nothing
        behind; only use it from a long-lived thread.
        """
        self.model_dir = Path(model_dir)
        self.port = port
        self.host = host
        self.served_model_name = served_model_name
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.max_lora_rank = max_lora_rank
        self.max_model_len = max_model_len
        self.kv_cache_gb = kv_cache_gb
        self.max_num_seqs = max_num_seqs
        self.dtype = dtype
        self.enforce_eager = enforce_eager
        self.log_path = Path(log_path) if log_path else Path(tempfile.gettempdir()) / f"flywheel-vllm-{port}.log"
        self.python = python or sys.executable
        self.die_with_parent = die_with_parent
        self.cpu_threads = cpu_threads or max(1, (os.cpu_count() or 2) - 1)
        self.extra_args = list(extra_args or [])
        self.extra_env = dict(extra_env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @classmethod
    def from_settings(cls, settings, **overrides) -> ManagedVllm:
        """A server for the deployment's base model, prepared and checked first (ModelError if
        it cannot be served); its context is the model's maximum capped by the setting."""

        model = overrides.pop("model", None) or ensure_base_model(
            settings, overrides.pop("on_step", lambda m: None))
        kwargs = dict(
            served_model_name=settings.base_model_name, max_loras=settings.vllm_max_loras,
            max_cpu_loras=settings.vllm_max_cpu_loras, max_lora_rank=settings.vllm_max_lora_rank,
            max_model_len=context_len(settings, model), kv_cache_gb=settings.vllm_kv_cache_gb,
            cpu_threads=settings.vllm_cpu_threads or None)
        path = model if isinstance(model, str) else model.path
        return cls(path, overrides.pop("port", settings.vllm_port), **{**kwargs, **overrides})

    @property
    def url(self) -> str:
        """Base URL without /v1, e.g. http://127.0.0.1:8100."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Pid of the API server process (also its process-group id), or None if not started."""
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        """The argv that start() runs."""
        argv = [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.served_model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--enable-lora",
            "--max-lora-rank", str(self.max_lora_rank),
            "--max-loras", str(self.max_loras),
            "--max-cpu-loras", str(self.max_cpu_loras),
            # Health polls would otherwise flood the log.
            "--disable-uvicorn-access-log",
        ]
        if self.max_num_seqs is not None:
            argv += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.enforce_eager:
            # No graphs to capture on CPU (and LoRA already turns compile off there); on a GPU it
            # trades decode speed for a faster, lighter start. Pass False for GPU benchmarks.
            argv.append("--enforce-eager")
        if self.kv_cache_gb is not None:
            # A fixed KV budget (CPU and GPU alike): a managed server shares its machine.
            argv += ["--kv-cache-memory-bytes", str(int(self.kv_cache_gb * 2**30))]
        return argv + self.extra_args

    def environment(self) -> dict[str, str]:
        """The child's environment: ours plus vLLM's runtime-LoRA and CPU KV-cache settings."""
        env = dict(os.environ)
        env.update(
            {
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                # vLLM's CPU platform forces a separate worker process unless this is 0; the
                # worker then runs inside the engine-core process (the API server stays apart).
                # Saves ~20 s of imports and ~600 MB per server on CPU; no effect on one GPU.
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                # "auto" pins every server's compute thread to core 0: several servers (or a
                # trainer) on one small machine would all contend for it.
                "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                # No phoning home: test and CI machines have no outside network.
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.model_dir.is_dir():
            # A local model needs no hub; without this, offline machines wait on hub timeouts.
            env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        # OpenMP threads spin at every barrier: with as many threads as cores, any other busy
        # process on the machine stalls each step (measured on 2 cores: 11 -> 0.7 tokens/s for
        # one stream of SmolLM2 beside one busy process; with 1 thread, 8.7 tokens/s quiet).
        env["OMP_NUM_THREADS"] = str(self.cpu_threads)
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        if self.kv_cache_gb is not None and float(self.kv_cache_gb).is_integer() and self.kv_cache_gb >= 1:
            # The legacy CPU knob overrides --kv-cache-memory-bytes there; keep them equal.
            env["VLLM_CPU_KVCACHE_SPACE"] = str(int(self.kv_cache_gb))
        env.update(self.extra_env)
        return env

    def start(self) -> ManagedVllm:
        """Launch the server in its own process group; returns at once (see wait_healthy)."""
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"vLLM already running (pid {self._proc.pid})")
        if not _port_free(self.host, self.port):
            # Otherwise wait_healthy() could be answered by whatever already listens there.
            raise VllmStartError(f"port {self.host}:{self.port} is already in use")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own group: stop()/kill() reach the engine children too
            preexec_fn=_set_parent_death_signal if self.die_with_parent else None,
        )
        return self

    def is_running(self) -> bool:
        """True while the API server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def wait_healthy(self, timeout: float = 180.0, poll_s: float = 0.5) -> float:
        """Poll GET /health until 200; return seconds waited. Raise VllmStartError otherwise."""
        if self._proc is None:
            raise RuntimeError("start() first")
        t0 = time.monotonic()
        deadline = t0 + timeout
        with httpx.Client(timeout=httpx.Timeout(2.0, connect=1.0)) as client:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise VllmStartError(f"vLLM exited with code {code} during startup\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return time.monotonic() - t0
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() >= deadline:
                    raise VllmStartError(f"vLLM not healthy after {timeout:.0f}s\n{self.log_tail()}")
                time.sleep(poll_s)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``timeout``; return the exit code."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            # Only the API server: it shuts its engine down in order. Signalling the whole
            # group at once kills the engine first and the server logs EngineDeadError.
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._proc.wait(timeout=10)
        # The server may exit before its engine children; do not leave them behind.
        self._signal_group(signal.SIGKILL)
        return self._finish()

    def kill(self) -> int | None:
        """SIGKILL the whole process group at once (crash simulation for fault tests)."""
        if self._proc is None:
            return None
        self._signal_group(signal.SIGKILL)
        self._proc.wait(timeout=10)
        return self._finish()

    def rss_bytes(self) -> int:
        """Resident memory of the server and all its descendants (Linux /proc), in bytes."""
        if self._proc is None or not self.is_running():
            return 0
        return sum(_rss(pid) for pid in _descendants(self._proc.pid))

    def log_tail(self, n_lines: int = 60) -> str:
        """The last lines of the server log."""
        try:
            data = self.log_path.read_bytes()[-32_000:]
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-n_lines:])

    def __enter__(self) -> ManagedVllm:
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass  # the whole group is already gone

    def _finish(self) -> int | None:
        assert self._proc is not None
        code = self._proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _set_parent_death_signal() -> None:
    # Runs in the child between fork and exec. PR_SET_PDEATHSIG = 1.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def _descendants(pid: int) -> list[int]:
    """pid and all its descendants, from /proc/<pid>/task/*/children."""
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                stack.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
    return out


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
