"""A throwaway stack for benchmarks: embedded Postgres + Redis in a temp dir, optional vLLM + API."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from sqlalchemy.orm import sessionmaker

from service.db import migrate
from service.db import repositories as repo
from service.db.session import make_sync_engine, session_scope
from service.local.embedded import ensure_postgres, ensure_redis, free_port, stop_postgres, stop_redis
from service.security import display_prefix, generate_key, hash_key
from tests.helpers.stack import TINY_MODEL_CACHE, ApiProcess, flywheel_env

RESULTS = Path(__file__).parent / "results"


def bench_model(name: str) -> Path:
    """The model a benchmark runs on: "tiny" (built locally), "smollm2" (the real default, from
    pip) or a model directory."""
    if name == "tiny":
        from service.local.tiny_model import build_tiny_model

        return build_tiny_model(TINY_MODEL_CACHE)
    from service.config import Settings
    from service.models.resolve import ensure_base_model

    return ensure_base_model(Settings(base_model=None if name == "smollm2" else name)).path


class BenchStack(ExitStack):
    """Services for one benchmark run; everything stops on exit."""

    def __init__(self, *, with_vllm: bool, api_workers: int = 1,
                 api_settings: dict[str, str] | None = None, model: str = "tiny") -> None:
        self.api_workers = api_workers
        self.model = model
        self.api_settings = api_settings or {}
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="fwbench-"))
        self.with_vllm = with_vllm
        self.vllm = None

    def __enter__(self) -> BenchStack:
        super().__enter__()
        emb = self.root / "embedded"
        self.db_url = ensure_postgres(emb)
        self.callback(stop_postgres, emb)
        migrate.upgrade(self.db_url)
        self.broker_url = ensure_redis(emb).url
        self.callback(stop_redis, emb)
        self.sessions = sessionmaker(make_sync_engine(self.db_url))
        settings = {"database_url": self.db_url, "broker_url": self.broker_url,
                    "data_dir": str(self.root / "data"), "vllm_urls": "http://127.0.0.1:9",
                    **self.api_settings}
        if self.with_vllm:
            from service.engine.managed import ManagedVllm

            model = bench_model(self.model)
            self.vllm = ManagedVllm(model, free_port(), log_path=self.root / "vllm.log",
                                    max_model_len=256 if self.model == "tiny" else 2048)
            self.vllm.start()
            self.callback(self.vllm.stop)
            self.vllm.wait_healthy(300)
            settings.update(vllm_urls=self.vllm.url, base_model=str(model))
        self.api = ApiProcess(env=flywheel_env(**settings), log=self.root / "api.log",
                              workers=self.api_workers).start()
        self.callback(self.api.stop)
        return self

    def key(self, tenant: str, role: str = "product") -> tuple[str, object]:
        key = generate_key()
        with session_scope(self.sessions) as s:
            row = repo.create_api_key(s, tenant_id=tenant, role=role, key_hash=hash_key(key),
                                      prefix=display_prefix(key))
            return key, row.id


def summarize(latencies_s: list[float], wall_s: float) -> dict:
    lat = sorted(latencies_s)
    return {"requests": len(lat), "throughput_rps": round(len(lat) / wall_s, 1),
            "p50_ms": round(1000 * statistics.median(lat), 2),
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2)}


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
