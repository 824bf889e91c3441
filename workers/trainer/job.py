"""The process that owns one local training job: `python -m workers.trainer.job run JOB_DIR`.

The local backend starts it in a session of its own, so it outlives the worker that submitted
it (a restarted worker re-attaches through the run row's reference). It starts `accelerate
launch` (launch.json) in a process group of its own, and while that runs:

- touches `heartbeat` every second (a worker on another machine sees the job alive by it);
- stops the training when `cancel` appears or on SIGTERM (the backend's cancel);
- stops it when no worker has polled (`attached` untouched) for `orphan_after_s`: its worker
  died and none took the run over, so the machine is not left training for nobody (the run
  resumes from its last checkpoint when a worker claims it again);
- writes `exit.json` (exit code and why) when the launch ends.

`python -m workers.trainer.job join JOB_DIR --machine-rank N` runs machine N of a multi-machine
training in the foreground, with the launch rank 0's job wrote (the job dir on shared storage).

No torch here: this process only supervises.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.files import atomic_write_text
from workers.trainer.launch import Launch, accelerate_argv

SPEC_FILE = "spec.json"
LAUNCH_FILE = "launch.json"  # {"launch": Launch.as_dict(), "orphan_after_s", "pythonpath"}
JOB_FILE = "job.json"  # this process: pid, start time, host, the launch's process group
HEARTBEAT_FILE = "heartbeat"
ATTACHED_FILE = "attached"
CANCEL_FILE = "cancel"
EXIT_FILE = "exit.json"
PROGRESS_FILE = "progress.jsonl"  # rank 0's progress events, one JSON object a line
RESULT_FILE = "result.json"
ERROR_PREFIX = "error-"  # error-<rank>.json: an exception a training process raised
LOG_FILE = "train.log"  # the launch's stdout and stderr

TICK_S = 1.0
STOP_GRACE_S = 10.0


def boot_id() -> str:
    """This boot of this machine (a pid means nothing across reboots)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (with the pid, its identity); None
    when there is no such process or it is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def read_json(path: Path) -> dict[str, Any] | None:
    """The file's JSON object, None when it is missing or not (yet) whole."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _die_with_parent() -> None:
    # The launch dies with this supervisor (PR_SET_PDEATHSIG): a lost supervisor must not leave
    # a training nobody can stop. Linux only; elsewhere the backend's cleanup still kills it.
    with contextlib.suppress(Exception):
        import ctypes  # noqa: PLC0415 - only in the child, between fork and exec

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


class _Supervisor:
    def __init__(self, job_dir: Path) -> None:
        self.dir = job_dir
        cfg = read_json(job_dir / LAUNCH_FILE)
        if cfg is None:
            raise SystemExit(f"{job_dir / LAUNCH_FILE}: missing or unreadable")
        self.launch = Launch.from_dict(cfg["launch"])
        self.orphan_after_s = float(cfg["orphan_after_s"])
        self.pythonpath = cfg.get("pythonpath")
        self.stop_reason: str | None = None
        self._stop = threading.Event()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop("cancelled"))
        env = _env(self.pythonpath)
        with open(self.dir / LOG_FILE, "ab") as log:
            child = subprocess.Popen(accelerate_argv(self.launch, 0), stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        atomic_write_text(self.dir / JOB_FILE, json.dumps({
            "pid": os.getpid(), "start": process_start(os.getpid()), "host": socket.gethostname(),
            "boot_id": boot_id(), "launch_pgid": child.pid,
            "started_at": datetime.now(UTC).isoformat()}) + "\n")
        while child.poll() is None:
            (self.dir / HEARTBEAT_FILE).touch()
            if self.stop_reason is None:
                self._check_stop()
            if self.stop_reason is not None:
                _stop_group(child)
                break
            self._stop.wait(TICK_S)
        rc = child.wait()
        atomic_write_text(self.dir / EXIT_FILE, json.dumps({
            "returncode": rc, "stopped": self.stop_reason,
            "finished_at": datetime.now(UTC).isoformat()}) + "\n")
        return 0

    def _request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason
        self._stop.set()

    def _check_stop(self) -> None:
        if (self.dir / CANCEL_FILE).exists():
            self._request_stop("cancelled")
            return
        try:
            idle = time.time() - (self.dir / ATTACHED_FILE).stat().st_mtime
        except OSError:
            idle = 0.0
        if idle > self.orphan_after_s:
            self._request_stop(f"orphaned: no worker polled it for {idle:.0f} s")


def _env(pythonpath: str | None) -> dict[str, str]:
    # The training imports this checkout's packages whatever directory it starts in.
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    return env


def _stop_group(child: subprocess.Popen) -> None:
    """SIGTERM the launch's process group, SIGKILL what is left after a grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGTERM)
    try:
        child.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)


def join(job_dir: Path, machine_rank: int) -> int:
    """Run machine `machine_rank` of the job's training here, in the foreground."""
    cfg = read_json(job_dir / LAUNCH_FILE)
    if cfg is None:
        raise SystemExit(f"{job_dir / LAUNCH_FILE}: missing or unreadable")
    argv = accelerate_argv(Launch.from_dict(cfg["launch"]), machine_rank)
    return subprocess.call(argv, env=_env(cfg.get("pythonpath")))


def main(argv: list[str] | None = None) -> int:
    """Command line: run (the local backend starts this) or join (another machine)."""
    parser = argparse.ArgumentParser(prog="python -m workers.trainer.job", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="supervise the job's launch (rank 0)").add_argument("job_dir", type=Path)
    j = sub.add_parser("join", help="run another machine of the job's training")
    j.add_argument("job_dir", type=Path)
    j.add_argument("--machine-rank", type=int, required=True)
    ns = parser.parse_args(argv)
    if ns.command == "run":
        return _Supervisor(ns.job_dir).run()
    return join(ns.job_dir, ns.machine_rank)


if __name__ == "__main__":
    sys.exit(main())
