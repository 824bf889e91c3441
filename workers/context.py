"""What a worker process holds (settings, a DB session factory, policies; built once per
process), where a run keeps its files, and how a stage says it cannot succeed."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from sqlalchemy.orm import sessionmaker

from service.config import Settings, get_settings
from service.db.session import make_sync_engine
from service.domain.policy import PolicyStore
from service.local.embedded import resolve_database_url
from service.models import resolve
from workers.training import read_jsonl


class StepFailed(RuntimeError):
    """The stage cannot succeed (bad data, gate error, ...): the run fails with this reason."""


@dataclass
class WorkerContext:
    settings: Settings
    sessions: sessionmaker
    policies: PolicyStore
    worker_id: str
    _model: object = field(default=None, repr=False)

    def base_model(self) -> str:
        """The base model directory (or hub id) to train on; the default is prepared once."""
        info = self._base_model_info()
        return info if isinstance(info, str) else str(info.path)

    def base_model_provenance(self) -> dict | None:
        """Where the base model came from (package, version, file and weights sha256), when
        Flywheel prepared it; lineage carries it so a version names the exact weights it needs."""
        info = self._base_model_info()
        return None if isinstance(info, str) else info.provenance

    def context_len(self) -> int:
        """Tokens per example the engine serves (the model's maximum, capped by the setting)."""
        return resolve.context_len(self.settings, self._base_model_info())

    def _base_model_info(self):
        if self._model is None:
            self._model = resolve.ensure_base_model(self.settings)
        return self._model


@lru_cache(maxsize=1)
def context() -> WorkerContext:
    """The process-wide context (lazily, so importing tasks never touches the DB)."""
    settings = get_settings()
    url = resolve_database_url(settings)
    engine = make_sync_engine(url, connect_timeout_s=settings.db_connect_timeout_s)
    return WorkerContext(settings=settings, sessions=sessionmaker(engine, expire_on_commit=False),
                         policies=PolicyStore(settings.policy_dir),
                         worker_id=f"{socket.gethostname()}:{os.getpid()}")


def run_dir(ctx: WorkerContext, run_id: uuid.UUID) -> Path:
    """Where a run keeps its files: data/ (the dataset step's), adapter/, work/."""
    return ctx.settings.resolved_artifact_dir / "runs" / str(run_id)


def heldout_raw(ctx: WorkerContext, run_id: uuid.UUID) -> list[dict]:
    """The run's held-out interactions as its dataset step wrote them ([] when it wrote none):
    what the eval gate scores and an export is compared on."""
    path = run_dir(ctx, run_id) / "data" / "heldout_raw.jsonl"
    return read_jsonl(path) if path.is_file() else []


# Below this much free space a failed write is taken to be a full disk: torch's checkpoint
# writer, for one, reports ENOSPC as a RuntimeError about stream positions.
_DISK_FULL_BYTES = 1 << 20


def disk_full_reason(ctx: WorkerContext, exc: BaseException, retry: str = "start a new run"
                     ) -> str | None:
    """A clear reason when a stage or export failed because the artifact disk is full, else None."""
    where = ctx.settings.resolved_artifact_dir
    enospc = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    try:
        low = shutil.disk_usage(where).free < _DISK_FULL_BYTES
    except OSError:
        low = False
    if not (enospc or low):
        return None
    return (f"artifact disk full ({where}): {type(exc).__name__}: {exc}; free space, then {retry} "
            "(artifacts are written atomically: nothing partial was recorded)")
