"""What a worker process holds: settings, a DB session factory, policies. Built once per process."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from functools import lru_cache

from sqlalchemy.orm import sessionmaker

from service.config import Settings, get_settings
from service.db.session import make_sync_engine
from service.embedded import resolve_database_url
from service.policy import PolicyStore


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
        from service.models.resolve import context_len

        return context_len(self.settings, self._base_model_info())

    def _base_model_info(self):
        if self._model is None:
            from service.models.resolve import ensure_base_model

            self._model = ensure_base_model(self.settings)
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
