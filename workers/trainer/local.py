"""The local trainer backend: each training is `accelerate launch` on this machine, owned by a
supervisor process (workers/trainer/job.py) in a session of its own.

The reference it returns names the job's directory, the supervisor's pid, host and boot, so a
worker that restarts on this machine re-attaches to a training still running; a worker on
another machine sharing the artifact volume sees it alive by its heartbeat file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.config import Settings
from service.files import atomic_write_text
from service.local.embedded import free_port
from workers.trainer import job as files
from workers.trainer.backend import JobStatus, TrainJob
from workers.trainer.launch import plan_launch

# Where `workers` and `service` are imported from: the training process must import the same.
_CODE_ROOT = str(Path(__file__).resolve().parents[2])
# A job on another machine is taken for alive while its heartbeat is younger than this.
HEARTBEAT_STALE_S = 30.0


class LocalAccelerateBackend:
    """Trains with `accelerate launch` on this machine (see the module docstring)."""

    name = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._children: dict[int, subprocess.Popen] = {}  # supervisors this process started
        self._offsets: dict[str, int] = {}  # progress bytes already read, per job dir

    # -- submit ---------------------------------------------------------------------------------

    def submit(self, job: TrainJob) -> dict[str, Any]:
        d = job.job_dir
        d.mkdir(parents=True, exist_ok=True)
        running = self._adopt(d, job.attempt)
        if running is not None:
            return running
        for stale in (files.EXIT_FILE, files.RESULT_FILE, files.CANCEL_FILE, files.PROGRESS_FILE):
            (d / stale).unlink(missing_ok=True)
        for stale_error in d.glob(files.ERROR_PREFIX + "*.json"):
            stale_error.unlink()
        spec = {**job.spec, "progress_path": str(d / files.PROGRESS_FILE),
                "result_path": str(d / files.RESULT_FILE), "error_dir": str(d)}
        atomic_write_text(d / files.SPEC_FILE, json.dumps(spec, sort_keys=True) + "\n")
        launch = plan_launch(self.settings, d / files.SPEC_FILE, free_port())
        atomic_write_text(d / files.LAUNCH_FILE, json.dumps({
            "launch": launch.as_dict(), "orphan_after_s": self._orphan_after_s(),
            "pythonpath": _CODE_ROOT}, sort_keys=True) + "\n")
        (d / files.ATTACHED_FILE).touch()
        with open(d / "supervisor.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "workers.trainer.job", "run", str(d)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self._children[proc.pid] = proc
        self._offsets[str(d)] = 0
        return {"backend": self.name, "dir": str(d), "attempt": job.attempt, "pid": proc.pid,
                "host": socket.gethostname(), "boot_id": files.boot_id(),
                "submitted_at": datetime.now(UTC).isoformat()}

    def _adopt(self, d: Path, attempt: int) -> dict[str, Any] | None:
        """The reference of a job still running in d: a worker died between submitting it and
        recording it on the run, and two trainings must never share a checkpoint directory."""
        info = files.read_json(d / files.JOB_FILE)
        if info is None or files.read_json(d / files.EXIT_FILE) is not None:
            return None
        ref = {"backend": self.name, "dir": str(d), "attempt": attempt, "pid": info["pid"],
               "host": info.get("host"), "boot_id": info.get("boot_id"),
               "submitted_at": info.get("started_at")}
        return ref if self._alive(ref, d) else None

    def _orphan_after_s(self) -> float:
        s = self.settings
        return s.train_orphan_after_s or max(3 * s.run_lease_s, 30.0)

    # -- poll -----------------------------------------------------------------------------------

    def poll(self, ref: dict[str, Any]) -> JobStatus:
        d = Path(ref["dir"])
        with contextlib.suppress(OSError):  # a full disk must not stop us reading the outcome
            os.utime(d / files.ATTACHED_FILE)
        events = self._read_events(d)
        if (not (d / files.RESULT_FILE).exists() and files.read_json(d / files.EXIT_FILE) is None
                and self._alive(ref, d)):
            return JobStatus("running", events)
        # It ended (or vanished): what it left is final. Progress written since counts too.
        events += self._read_events(d)
        if (d / files.RESULT_FILE).exists():
            return JobStatus("succeeded", events)
        ended = files.read_json(d / files.EXIT_FILE)
        if ended is None:
            self._kill_leftovers(ref, d)
            return JobStatus("lost", events, detail=self._lost_detail(ref, d))
        detail = _exit_detail(ended)
        error = _first_error(d)
        if error is not None and not ended.get("stopped"):
            return JobStatus("failed", events, error=error, detail=detail)
        return JobStatus("lost", events, detail=detail + _log_tail(d))

    def _alive(self, ref: dict[str, Any], d: Path) -> bool:
        pid = int(ref["pid"])
        if pid in self._children:  # ours: poll() also reaps it
            return self._children[pid].poll() is None
        if ref.get("host") != socket.gethostname() or ref.get("boot_id") != files.boot_id():
            try:  # another machine (or before a reboot): only the heartbeat can tell
                age = time.time() - (d / files.HEARTBEAT_FILE).stat().st_mtime
            except OSError:
                return False
            return age < HEARTBEAT_STALE_S
        started = files.process_start(pid)
        if started is None:
            return False
        recorded = (files.read_json(d / files.JOB_FILE) or {}).get("start")
        return recorded is None or recorded == started  # a reused pid is another process

    def _kill_leftovers(self, ref: dict[str, Any], d: Path) -> None:
        """The supervisor is gone without an exit record (killed): stop what it launched."""
        info = files.read_json(d / files.JOB_FILE) or {}
        pgid = info.get("launch_pgid")
        if pgid and ref.get("host") == socket.gethostname() and ref.get("boot_id") == files.boot_id():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pgid), signal.SIGKILL)

    def _lost_detail(self, ref: dict[str, Any], d: Path) -> str:
        if ref.get("host") != socket.gethostname():
            return f"no heartbeat from the job on {ref.get('host')}" + _log_tail(d)
        return "the training's supervisor process ended without an exit record" + _log_tail(d)

    def _read_events(self, d: Path) -> list[dict[str, Any]]:
        key = str(d)
        try:
            with open(d / files.PROGRESS_FILE, "rb") as f:
                f.seek(self._offsets.get(key, 0))
                chunk = f.read()
        except OSError:
            return []
        whole = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits
        self._offsets[key] = self._offsets.get(key, 0) + len(whole)
        events = []
        for line in whole.splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    # -- cancel, result -------------------------------------------------------------------------

    def cancel(self, ref: dict[str, Any]) -> None:
        d = Path(ref["dir"])
        with contextlib.suppress(OSError):
            (d / files.CANCEL_FILE).touch()  # seen by the supervisor wherever it runs
        if self._alive(ref, d) and ref.get("host") == socket.gethostname():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(ref["pid"]), signal.SIGTERM)

    def result(self, ref: dict[str, Any]) -> dict[str, Any]:
        out = files.read_json(Path(ref["dir"]) / files.RESULT_FILE)
        if out is None:
            raise RuntimeError(f"training job {ref['dir']} has no result")
        return out


def _exit_detail(ended: dict[str, Any]) -> str:
    rc = ended.get("returncode")
    if ended.get("stopped"):
        return f"stopped ({ended['stopped']})"
    if isinstance(rc, int) and rc < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-rc).name}"
    return f"exited with code {rc}"


def _first_error(d: Path) -> dict[str, Any] | None:
    """The lowest rank's reported error (rank 0's when it has one)."""
    errors = sorted(d.glob(files.ERROR_PREFIX + "*.json"))
    for path in errors:
        err = files.read_json(path)
        if err is not None:
            return err
    return None


def _log_tail(d: Path, lines: int = 3) -> str:
    try:
        tail = (d / files.LOG_FILE).read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return (": " + " | ".join(t.strip()[:200] for t in tail)) if tail else ""
