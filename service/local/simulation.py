"""The simulated product's stack and client, shared by `flywheel demo` and the learning
benchmark (bench/learning).

- `SimulatedStack`: a base model plus the real stack (`service.local.supervisor.Stack`: embedded
  Postgres and Redis, a managed vLLM, the API, a Celery worker and beat) under one directory,
  with a product and an ops key;
- `ProductClient`: chats through the gateway, posts feedback and follows runs through the runs
  API, as a product and its ops would.

What the users want lives in a task (service/tasks/), which the worker never imports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy.orm import sessionmaker

from service.config import Settings
from service.db import repositories as repo
from service.db.session import make_sync_engine, session_scope
from service.local.embedded import free_port
from service.local.supervisor import Stack
from service.local.tiny_model import build_tiny_model
from service.security import display_prefix, generate_key, hash_key

ALIAS = "support-bot"
TENANT = "demo"


# --- the stack ---------------------------------------------------------------------------------


@dataclass
class SimulatedStack:
    """A base model + the real stack under `root`, with the simulated tenant's keys."""

    root: Path
    settings: Settings
    model_dir: Path
    stack: Stack | None = None  # set by start()
    product_key: str = ""
    ops_key: str = ""

    @classmethod
    def prepare(cls, root: Path, base: Settings, *, model_dir: Path | None, policy_yaml: str,
                pretrain_steps: int = 0, embedded: bool = False) -> SimulatedStack:
        """Write the policy and pick the model; nothing is started yet.

        model_dir None: the deployment's base model (by default SmolLM2, prepared when the
        stack starts); else the tiny model is built (or reused) there. embedded=True ignores
        configured Postgres/Redis/vLLM URLs: everything starts fresh under `root`. Otherwise
        configured database and broker URLs are kept (as the demo does).
        """
        root = Path(root).resolve()
        (root / "policies").mkdir(parents=True, exist_ok=True)
        (root / "policies" / "default.yaml").write_text(policy_yaml)
        if model_dir is None:
            model = base.base_model
        else:
            model = str(build_tiny_model(Path(model_dir).resolve(), pretrain_steps=pretrain_steps))
        settings = base.model_copy(update={
            "data_dir": root, "base_model": model, "vllm_urls": None,
            "policy_dir": root / "policies", "artifact_dir": root / "artifacts",
            "vllm_port": free_port(),
            "database_url": None if embedded else base.database_url,
            "broker_url": None if embedded else base.broker_url})
        return cls(root=root, settings=settings,
                   model_dir=Path(settings.resolved_base_model))

    def start(self, on_step: Callable[[str], None] = lambda m: None) -> SimulatedStack:
        self.stack = Stack(self.settings, api_port=free_port(), log_dir=self.root / "logs")
        self.stack.start(on_step=on_step)
        self.product_key, self.ops_key = self._keys()
        return self

    @property
    def api_url(self) -> str:
        return self._started().api_url

    def _started(self) -> Stack:
        if self.stack is None:
            raise RuntimeError("the simulated stack is not running: call start() first")
        return self.stack

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def _keys(self) -> tuple[str, str]:
        engine = make_sync_engine(self._started().env["FLYWHEEL_DATABASE_URL"])
        keys = []
        try:
            with session_scope(sessionmaker(engine)) as s:
                repo.ensure_adapter(s, TENANT, ALIAS, "the simulated product's support bot")
                for role in ("product", "ops"):
                    key = generate_key()
                    repo.create_api_key(s, tenant_id=TENANT, role=role, key_hash=hash_key(key),
                                        prefix=display_prefix(key), name=f"simulated {role}")
                    keys.append(key)
        finally:
            engine.dispose()
        return keys[0], keys[1]

    def dead_children(self) -> list[str]:
        return self.stack.dead_children() if self.stack is not None else []

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()


# --- the product ---------------------------------------------------------------------------------


class RunFailed(RuntimeError):
    """A run ended failed, or did not reach the awaited state in time."""


class ProductClient:
    """The simulated product's side of the API: chat, feedback, and ops reads of runs."""

    def __init__(self, api: httpx.Client, product_key: str, ops_key: str, alias: str = ALIAS,
                 *, max_tokens: int = 24) -> None:
        self.api, self.alias, self.max_tokens = api, alias, max_tokens
        self.product = {"Authorization": f"Bearer {product_key}"}
        self.ops = {"Authorization": f"Bearer {ops_key}"}

    def chat(self, question: str) -> tuple[str, str]:
        """(answer, interaction id) for one greedy completion through the gateway."""
        return self.chat_messages([{"role": "user", "content": question}])

    def chat_messages(self, messages: list[dict], max_tokens: int | None = None) -> tuple[str, str]:
        """(answer, interaction id) for one greedy completion of a conversation."""
        r = self.api.post("/v1/chat/completions", headers=self.product, json={
            "model": self.alias, "temperature": 0, "max_tokens": max_tokens or self.max_tokens,
            "messages": messages})
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"] or "", r.headers["x-interaction-id"]

    def ask_all(self, conversations: Sequence[list[dict]], *, max_tokens: int | None = None,
                concurrency: int = 8) -> list[tuple[str, str]]:
        """Answers (and interaction ids) for many conversations at once, in their order: the
        engine batches concurrent requests, so this is several times faster than one by one."""
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(lambda m: self.chat_messages(m, max_tokens), conversations))

    def served_model(self, interaction_id: str) -> str:
        r = self.api.get(f"/v1/interactions/{interaction_id}", headers=self.product)
        r.raise_for_status()
        return r.json()["served_model"]

    def feedback(self, interaction_id: str, body: dict, rater_id: str) -> None:
        r = self.api.post("/v1/feedback", headers=self.product,
                          json={"interaction_id": interaction_id, "rater_id": rater_id, **body})
        r.raise_for_status()

    def wait_serving(self, lora_name: str, timeout: float = 30) -> None:
        """Until the gateway routes the alias to `lora_name` (its routing cache has a TTL)."""
        deadline = time.monotonic() + timeout
        while True:
            _, iid = self.chat("Hello, I am Alice.")
            if self.served_model(iid) == lora_name:
                return
            if time.monotonic() > deadline:
                raise RunFailed(f"the gateway still does not serve {lora_name} after {timeout}s")
            time.sleep(0.3)

    # runs (ops key)

    def runs(self) -> list[dict]:
        r = self.api.get("/v1/runs", headers=self.ops, params={"alias": self.alias})
        r.raise_for_status()
        return r.json()

    def run(self, run_id: str) -> dict:
        r = self.api.get(f"/v1/runs/{run_id}", headers=self.ops)
        r.raise_for_status()
        return r.json()

    def approve(self, run_id: str, reason: str) -> dict:
        r = self.api.post(f"/v1/runs/{run_id}/approve", headers=self.ops, json={"reason": reason})
        r.raise_for_status()
        return r.json()

    def wait_new_run(self, known: set[str], timeout: float = 60,
                     alive: Callable[[], None] = lambda: None) -> dict:
        """The first run whose id is not in `known` (the trigger is debounced)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fresh = [r for r in self.runs() if r["id"] not in known]
            if fresh:
                return fresh[-1]  # newest first: the last is the oldest new one
            alive()
            time.sleep(0.3)
        raise RunFailed(f"no run was created within {timeout}s")

    def wait_state(self, run_id: str, states: set[str], *, timeout: float = 900,
                   on_poll: Callable[[dict], None] = lambda run: None,
                   alive: Callable[[], None] = lambda: None, interval: float = 0.3) -> dict:
        """Poll the run until it is in one of `states`; on_poll sees every reading."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.run(run_id)
            on_poll(run)
            if run["state"] in states:
                return run
            if run["state"] == "failed":
                raise RunFailed(f"run {run_id} failed: {run.get('failure_reason')}")
            alive()
            time.sleep(interval)
        raise RunFailed(f"run {run_id} did not reach {sorted(states)} within {timeout}s")
