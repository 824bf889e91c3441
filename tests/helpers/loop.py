"""The whole loop in end-to-end and fault tests: a small policy for a real run on the tiny model,
an API and a real Celery worker behind it, and a product driven through the gateway."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import yaml

from service.db.models import TrainingRun
from tests.helpers.auth import bearer
from tests.helpers.data import api_key_id, seed_interactions
from tests.helpers.runs import wait_first_run
from tests.helpers.stack import ApiProcess, WorkerProcess, flywheel_env
from workers.dataset import is_heldout

PROMPTS = ["Where is my order {i}?", "How do I reset my password ({i})?", "Can I get a refund for item {i}?",
           "My parcel {i} is late, what now?"]

# --- policies ----------------------------------------------------------------------------------

# The golden case is a check the gate can fail (leaked chat-template markup) and evidence when
# the held-out draw is empty; not `non_empty`: the tiny model answers some prompts with nothing.
GOLDEN = {"prompt": "My order is late.", "no_template_tokens": True}
# Post-deploy watch on thumbs-up, for the tests that deploy and watch a version.
WATCH = {"window_minutes": 60, "min_samples": 10, "max_drop": 0.1, "alpha": 0.05}


def loop_policy(*, min_new_ratings: int, max_steps: int, heldout_fraction: float,
                **sections: Any) -> str:
    """default.yaml for a small real run gated on GOLDEN and approved by hand.

    A keyword naming a section of the base (training, dataset, gate) replaces those of its
    keys; any other (watch, rollback, export) adds that section."""
    policy: dict[str, Any] = {
        "trigger": {"min_new_ratings": min_new_ratings},
        "training": {"method": "auto", "max_steps": max_steps, "batch_size": 4,
                     "learning_rate": 5.0e-3, "checkpoint_every_steps": 2},
        "dataset": {"heldout_fraction": heldout_fraction, "min_examples": 2},
        "gate": {"min_preference_accuracy": 0.0, "max_nll_regression": 10.0, "golden": [GOLDEN]},
        "approval": "manual",
    }
    for name, values in sections.items():
        policy[name] = {**policy.get(name, {}), **values}
    return yaml.safe_dump(policy, sort_keys=False)


# A run long enough to kill its worker in the middle (150 steps, a checkpoint every 5).
LONG_RUN_POLICY = loop_policy(
    min_new_ratings=12, max_steps=150, heldout_fraction=0.2,
    training={"method": "sft", "learning_rate": 1.0e-3, "checkpoint_every_steps": 5},
    gate={"max_nll_regression": 100.0})


def policy_dir(path: Path, policy: str) -> Path:
    """A policy directory holding `policy` as its default.yaml."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "default.yaml").write_text(policy)
    return path


# --- an API and a worker -----------------------------------------------------------------------

class LoopStack(NamedTuple):
    api: ApiProcess
    worker: WorkerProcess
    policies: Path  # the policy_dir both read: a file written here applies without a restart


@contextmanager
def api_and_worker(api_settings: dict[str, str], root: Path, policies: Path, name: str, *,
               worker_name: str = "w1", **settings: str) -> Iterator[LoopStack]:
    """An API and a real Celery worker (beat inside: sweeper, watch) on the session's services,
    with their own policy dir and artifact dir; logs root/api-<name>.log, root/worker-<name>.log."""
    env = flywheel_env(**{**api_settings, "policy_dir": str(policies),
                          "artifact_dir": str(root / f"{name}-artifacts"), "run_lease_s": "20",
                          "sweep_interval_s": "2", **settings})
    with ApiProcess(env=env, log=root / f"api-{name}.log") as api, \
            WorkerProcess(env=env, log=root / f"worker-{name}.log", name=worker_name,
                          beat=True) as worker:
        yield LoopStack(api, worker, policies)


# --- a product ---------------------------------------------------------------------------------

def chat_and_rate(c, key, alias, n, rating=None, heldout_fraction: float | None = None) -> list[str]:
    """n chats through the gateway, each rated (alternating up/down unless rating is given;
    every fourth thumbs-down carries a correction).

    With heldout_fraction (the policy's), the first interaction the dataset will hold out gets
    the first corrected thumbs-down (one with a non-empty answer where there is one: the tiny
    model answers some prompts with nothing), so the gate has a (correction, answer) pair to
    score: the split hashes random interaction ids, and left alone about one draw in fifty
    holds no comparable pair."""
    ids, answered = [], []
    for i in range(n):
        r = c.post("/v1/chat/completions", headers=bearer(key), json={
            "model": alias, "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": PROMPTS[i % 4].format(i=i)}]})
        assert r.status_code == 200, r.text
        ids.append(r.headers["x-interaction-id"])
        answered.append(bool((r.json()["choices"][0]["message"].get("content") or "").strip()))
    order = list(range(n))
    if heldout_fraction is not None and rating is None:
        held = sorted((i for i, iid in enumerate(ids) if is_heldout(iid, heldout_fraction)),
                      key=lambda i: not answered[i])
        assert held, "no interaction landed in the held-out set"
        order[0], order[held[0]] = order[held[0]], order[0]
    for i, iid in zip(order, ids, strict=True):
        body = {"interaction_id": iid, "rating": rating or ("up" if i % 2 else "down"),
                "rater_id": f"u{i % 5}"}
        if rating is None and i % 4 == 0:
            body["correction"] = "Thanks for asking: your order ships tomorrow, user@example.com."
        assert c.post("/v1/feedback", headers=bearer(key), json=body).status_code == 201
    return ids


def rate_all(url: str, key: str, ids: list[str]) -> list[int]:
    """Rate each interaction up through the API (four raters in turn); the status codes."""
    with httpx.Client(base_url=url, timeout=30) as c:
        return [c.post("/v1/feedback", headers=bearer(key),
                       json={"interaction_id": iid, "rating": "up", "rater_id": f"r{i % 4}"}).status_code
                for i, iid in enumerate(ids)]


def rated_run(db_sessions, url: str, key: str, tenant: str, alias: str, n: int) -> TrainingRun:
    """n interactions seeded as sent with `key`, each rated up through the API: the run they
    start (n reaches the policy's trigger)."""
    ids = seed_interactions(db_sessions, tenant, alias, api_key_id(db_sessions, key), n,
                            answer="Your order {i} ships tomorrow.")
    assert rate_all(url, key, ids) == [201] * n
    return wait_first_run(db_sessions, tenant, alias)


def served_by(c, key: str, alias: str, lora_name: str, timeout: float) -> dict:
    """Chat with the alias until the version named lora_name serves it (within the routing
    bound) or time is up; the last interaction as GET /v1/interactions shows it."""
    deadline = time.monotonic() + timeout
    while True:
        r = c.post("/v1/chat/completions", headers=bearer(key), json={
            "model": alias, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        served = c.get(f"/v1/interactions/{r.headers['x-interaction-id']}",
                       headers=bearer(key)).json()
        if served["served_model"] == lora_name or time.monotonic() > deadline:
            return served
        time.sleep(0.3)
