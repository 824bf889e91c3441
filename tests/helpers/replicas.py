"""Two extra vLLM replicas, an API in front of them, and real LoRA artifacts for swap tests.

A pytest plugin (tests/conftest.py registers it): the session fixtures below are shared by the
swap and reconcile tests, so the two vLLM CPU servers start once per session, and only in a
session that asks for them. The builders are plain functions, also used by bench/bench_swap.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from service.db import repositories as repo
from service.db.hotpath import PENDING
from service.db.models import Adapter, AdapterVersion, Interaction, VersionStatus
from service.db.session import session_scope
from service.engine.artifact import CONFIG_FILE, WEIGHTS_FILE, artifact_sha256, file_sha256
from service.engine.managed import ManagedVllm
from service.engine.sizing import EngineSize
from service.engine.swap import SwapConfig
from service.engine.vllm_admin import VllmAdmin
from service.local.embedded import free_port
from tests.helpers.auth import bearer
from tests.helpers.stack import ApiProcess, flywheel_env

MAX_LORAS = 8
MAX_CPU_LORAS = 32
MAX_LORA_RANK = 16
ROUTING_TTL_S = 0.5
DRAIN_S = 3.0
BAD_KINDS = ("wrong_sha", "wrong_base", "pickle_only", "rank_too_large", "nan", "modules_to_save")


# --- replicas ----------------------------------------------------------------------------------

@dataclass
class ReplicaSet:
    """Managed vLLM servers on fixed ports, so a restarted one keeps its URL."""

    model_dir: Path
    log_dir: Path
    servers: list[ManagedVllm] = field(default_factory=list)
    # Set: server i listens on hosts[i], all on one port (replicas behind one DNS name).
    hosts: list[str] | None = None

    @classmethod
    def start(cls, model_dir: Path, log_dir: Path, n: int = 2,
              hosts: list[str] | None = None) -> ReplicaSet:
        rs = cls(model_dir, log_dir, hosts=hosts)
        if hosts:
            port = free_port(hosts[0])
            rs.servers = [rs._server(port, i) for i in range(len(hosts))]
        else:
            rs.servers = [rs._server(free_port(), i) for i in range(n)]
        try:
            for s in rs.servers:
                s.start()
            # Started together, waited together: the two boots overlap.
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(lambda s: s.wait_healthy(timeout=300), rs.servers))
        except BaseException:
            rs.stop()
            raise
        return rs

    def _server(self, port: int, i: int) -> ManagedVllm:
        host = self.hosts[i] if self.hosts else "127.0.0.1"
        return ManagedVllm(self.model_dir, port, max_loras=MAX_LORAS, max_cpu_loras=MAX_CPU_LORAS,
                           max_lora_rank=MAX_LORA_RANK, kv_cache_gb=0.0625, host=host,
                           log_path=self.log_dir / f"replica-{host}-{port}.log",
                           die_with_parent=True)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def stop_one(self, i: int, *, crash: bool = False) -> None:
        """Stop replica i (SIGKILL when crash)."""
        self.servers[i].kill() if crash else self.servers[i].stop()

    def start_one(self, i: int) -> float:
        """Start replica i again, empty, on its old port; seconds until healthy."""
        old = self.servers[i]
        old.stop()  # no-op when already stopped; reaps a killed group
        self.servers[i] = self._server(old.port, i)
        self.servers[i].start()
        return self.servers[i].wait_healthy(timeout=300)

    def restart(self, i: int, *, crash: bool = False) -> float:
        """Stop (or kill) replica i and start it again, empty; seconds taken."""
        t0 = time.monotonic()
        self.stop_one(i, crash=crash)
        self.start_one(i)
        return time.monotonic() - t0

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def admins(self, timeout_s: float = 60.0) -> list[VllmAdmin]:
        return [VllmAdmin(u, timeout_s=timeout_s) for u in self.urls]


def swap_config(model_dir: Path, drain_s: float = DRAIN_S) -> SwapConfig:
    """The SwapConfig matching ReplicaSet's engine flags."""
    return SwapConfig(engine_base_model=str(model_dir), max_lora_rank=MAX_LORA_RANK,
                      engine_size=EngineSize(MAX_LORAS, MAX_CPU_LORAS), drain_s=drain_s,
                      lock_wait_s=10.0)


def api_env(db_url: str, broker_url: str, urls: list[str], model_dir: Path, data_dir: Path,
            **extra: str) -> dict[str, str]:
    """Environment for a `flywheel api` in front of the given replicas."""
    settings = dict(
        database_url=db_url, broker_url=broker_url, vllm_urls=",".join(urls),
        base_model=str(model_dir), data_dir=str(data_dir), routing_cache_ttl_s=str(ROUTING_TTL_S),
        auth_cache_ttl_s="1", replica_observe_interval_s="0.2", reconcile_interval_s="1",
        drain_s=str(DRAIN_S), warm_grace_s="600", vllm_max_loras=str(MAX_LORAS),
        vllm_max_cpu_loras=str(MAX_CPU_LORAS), vllm_max_lora_rank=str(MAX_LORA_RANK))
    return flywheel_env(**{**settings, **extra})


# --- artifacts ---------------------------------------------------------------------------------

def peft_lora(model_dir: Path, out_dir: Path, *, r: int = 8, seed: int = 0) -> Path:
    """A real PEFT LoRA (q_proj/v_proj, random non-zero init) reduced to the two shipped files."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                        lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(base, config)
    model.save_pretrained(out_dir, safe_serialization=True)
    for p in Path(out_dir).iterdir():
        if p.name not in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    _edit_config(out_dir, base_model_name_or_path=str(model_dir))
    return Path(out_dir)


def _edit_config(d: Path, **changes: object) -> None:
    cfg = json.loads((Path(d) / CONFIG_FILE).read_text())
    cfg.update(changes)
    (Path(d) / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))


def _rewrite_weights(template: Path, out_dir: Path, make: Callable[[str, object], object]) -> None:
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True)
    shutil.copy(template / CONFIG_FILE, out_dir / CONFIG_FILE)
    tensors = load_file(str(template / WEIGHTS_FILE))
    save_file({k: make(k, t).contiguous() for k, t in tensors.items()}, str(out_dir / WEIGHTS_FILE))


def lora_variant(template: Path, out_dir: Path, *, seed: int, kind: str = "good") -> Path:
    """A new artifact from the template: fresh random weights, or one of BAD_KINDS."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def fresh(_k: str, t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen) * 0.05

    if kind == "pickle_only":
        out_dir.mkdir(parents=True)
        shutil.copy(template / CONFIG_FILE, out_dir / CONFIG_FILE)
        from safetensors.torch import load_file

        torch.save(load_file(str(template / WEIGHTS_FILE)), out_dir / "adapter_model.bin")
        return out_dir
    if kind == "rank_too_large":
        r = 2 * MAX_LORA_RANK

        def wide(k: str, t: torch.Tensor) -> torch.Tensor:
            shape = (r, t.shape[1]) if "lora_A" in k else (t.shape[0], r)
            return torch.randn(shape, generator=gen) * 0.05
        _rewrite_weights(template, out_dir, wide)
        _edit_config(out_dir, r=r, lora_alpha=2 * r)
        return out_dir
    if kind == "nan":
        first = []

        def poisoned(k: str, t: torch.Tensor) -> torch.Tensor:
            t = fresh(k, t)
            if not first:
                first.append(k)
                t[0, 0] = float("nan")
            return t
        _rewrite_weights(template, out_dir, poisoned)
        return out_dir
    _rewrite_weights(template, out_dir, fresh)
    if kind == "wrong_base":
        _edit_config(out_dir, base_model_name_or_path="/models/some-other-base")
    elif kind == "modules_to_save":
        _edit_config(out_dir, modules_to_save=["lm_head"])
    elif kind not in ("good", "wrong_sha"):
        raise ValueError(f"unknown artifact kind {kind!r}")
    return out_dir


def register_version(sessions: sessionmaker, tenant: str, alias: str, artifact: Path, *,
                     sha256: str | None = None) -> tuple[uuid.UUID, str]:
    """A candidate version of tenant/alias for the artifact; returns (version id, lora name)."""
    with session_scope(sessions) as s:
        adapter = repo.ensure_adapter(s, tenant, alias)
        v = repo.create_version(s, adapter, artifact_path=str(artifact),
                                sha256=sha256 or artifact_sha256(artifact),
                                parent_version_id=adapter.serving_version_id, run_id=None,
                                lineage={"test": True})
        return v.id, v.lora_name


def release_aliases(sessions: sessionmaker, adapter_ids: list[uuid.UUID]) -> None:
    """Put aliases back on the base model and retire their versions (reconcilers unload them)."""
    if not adapter_ids:
        return
    with session_scope(sessions) as s:
        s.execute(update(Adapter).where(Adapter.id.in_(adapter_ids)).values(
            serving_version_id=None, previous_version_id=None, canary_version_id=None,
            canary_share=0.0))
        s.execute(update(AdapterVersion).where(
            AdapterVersion.adapter_id.in_(adapter_ids),
            AdapterVersion.status.in_(["live", "warm", "staged"])).values(
            status=VersionStatus.retired.value))


@dataclass
class Versions:
    """Builds and registers versions for one test; its aliases are released at teardown."""

    sessions: sessionmaker
    template: Path
    root: Path
    tenant: str
    adapters: list[uuid.UUID] = field(default_factory=list)
    _seed: int = 0

    def alias(self, name: str | None = None) -> tuple[str, uuid.UUID]:
        name = name or f"bot-{uuid.uuid4().hex[:6]}"
        with session_scope(self.sessions) as s:
            adapter_id = repo.ensure_adapter(s, self.tenant, name).id
        self.adapters.append(adapter_id)
        return name, adapter_id

    def new(self, alias: str, kind: str = "good") -> tuple[uuid.UUID, str]:
        """Register a fresh artifact of ``kind`` for alias; returns (version id, lora name)."""
        self._seed += 1
        d = lora_variant(self.template, self.root / f"{alias}-{self._seed}-{kind}",
                         seed=self._seed + zlib.crc32(self.tenant.encode()) % 10_000, kind=kind)
        sha = None
        if kind == "wrong_sha":
            sha = "ab" * 32
        elif kind == "pickle_only":  # what a pickle-shipping trainer would have recorded
            sha = file_sha256(d / "adapter_model.bin")
        return register_version(self.sessions, self.tenant, alias, d, sha256=sha)


# --- traffic -----------------------------------------------------------------------------------

@dataclass
class Shot:
    """One chat request through the gateway: wall-clock start/end, status, interaction id."""

    start: float
    end: float
    status: int
    interaction_id: str | None
    error: str | None = None


@dataclass
class Traffic:
    """Concurrent chat requests against an alias until stopped; every request is kept."""

    base_url: str
    key: str
    alias: str
    concurrency: int = 8
    max_tokens: int = 2
    shots: list[Shot] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=60, limits=limits) as client:
            await asyncio.gather(*(self._worker(client, i) for i in range(self.concurrency)))

    async def _worker(self, client, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            body = {"model": self.alias, "max_tokens": self.max_tokens, "temperature": 0,
                    "user": f"user-{i}-{n % 5}",
                    "messages": [{"role": "user", "content": f"hello {i} {n}"}]}
            start = time.time()
            try:
                r = await client.post("/v1/chat/completions", json=body, headers=bearer(self.key))
                self.shots.append(Shot(start, time.time(), r.status_code,
                                       r.headers.get("x-interaction-id"),
                                       None if r.status_code == 200 else r.text[:300]))
            except httpx.HTTPError as e:
                self.shots.append(Shot(start, time.time(), 0, None, repr(e)))

    async def until(self, n: int, *, not_before: float = 0.0, timeout: float = 120.0) -> None:
        """Wait until n requests finished and the wall clock passed not_before."""
        deadline = time.monotonic() + timeout
        while len(self.shots) < n or time.time() < not_before:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.shots)} requests done")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()

    @property
    def failed(self) -> list[Shot]:
        return [s for s in self.shots if s.status != 200]


async def chat(api_url: str, key: str, alias: str, user: str | None = None) -> str:
    """One greedy two-token request through the gateway (as `user`, for a sticky canary); its
    interaction id."""
    body = {"model": alias, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": "hi"}]}
    if user:
        body["user"] = user
    async with httpx.AsyncClient(base_url=api_url, timeout=60) as c:
        r = await c.post("/v1/chat/completions", json=body, headers=bearer(key))
    assert r.status_code == 200, r.text
    return r.headers["x-interaction-id"]


def served_models(sessions: sessionmaker, interaction_ids: list[str],
                  timeout: float = 10.0) -> dict[str, tuple[str, str]]:
    """interaction id -> (served_model, replica) as the gateway stored it.

    The gateway writes a non-stream answer just after replying (the row is `pending` until
    then), so this waits until every asked-for row carries its answer."""
    ids = [uuid.UUID(i) for i in interaction_ids if i]
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(sessions) as s:
            rows = list(s.execute(select(Interaction.id, Interaction.served_model,
                                         Interaction.replica, Interaction.finish_reason)
                                  .where(Interaction.id.in_(ids))))
        if all(r.finish_reason != PENDING for r in rows) or time.monotonic() > deadline:
            return {str(r.id): (r.served_model, r.replica) for r in rows}
        time.sleep(0.05)


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def swap_replicas(tiny_model, stack_root) -> Iterator[ReplicaSet]:
    """Two vLLM (CPU) replicas on the tiny model, shared by the swap and reconcile tests."""
    rs = ReplicaSet.start(tiny_model, stack_root)
    try:
        yield rs
    finally:
        rs.stop()


@pytest.fixture(scope="session")
def swap_api(swap_replicas, db_url, broker_url, tiny_model, stack_root) -> Iterator[ApiProcess]:
    """`flywheel api` routing to the two replicas, with its observer and reconciler running."""
    env = api_env(db_url, broker_url, swap_replicas.urls, tiny_model, stack_root / "swap-data")
    proc = ApiProcess(env=env, log=stack_root / "swap-api.log").start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def lora_template(tiny_model, tmp_path_factory) -> Path:
    return peft_lora(tiny_model, tmp_path_factory.mktemp("lora") / "template")


@pytest.fixture()
async def admins(swap_replicas) -> AsyncIterator[list[VllmAdmin]]:
    """A VllmAdmin client per replica, closed after the test."""
    clients = swap_replicas.admins()
    yield clients
    for c in clients:
        await c.aclose()


@pytest.fixture()
def versions(db_sessions, lora_template, tenant, tmp_path) -> Iterator[Versions]:
    v = Versions(db_sessions, lora_template, tmp_path, tenant)
    try:
        yield v
    finally:
        release_aliases(db_sessions, v.adapters)


@pytest.fixture()
def swap_cfg(tiny_model) -> SwapConfig:
    return swap_config(tiny_model)
