"""A simulated product, shared by `flywheel demo` and the learning benchmark (bench/sim_product.py).

A support bot answers "My <product> <issue>." questions. Its users want "I am sorry that your
<product> <issue>. We will send you a new <product> today." That preference is the hidden rater
below: it lives in this module only, the training code (workers/) never imports it and sees
nothing but what the product posts through the public API (a rating, sometimes a correction).

The pieces:

- the task distribution: (product, issue) combinations phrased by question templates; a fixed
  fifth of the combinations is held out, so held-out questions are never asked by the users the
  loop learns from;
- `HiddenRater`: thumbs-up when the answer offers a new product, else thumbs-down, with the
  wanted answer as a correction some of the time;
- `SimulatedStack`: the tiny base model plus the real stack (`service.supervisor.Stack`: embedded
  Postgres and Redis, a managed vLLM, the API, a Celery worker and beat) under one directory,
  with a product and an ops key;
- `ProductClient`: chats through the gateway, posts feedback, measures the thumbs-up rate on
  held-out questions (without posting it: held-out ratings must never become training data),
  and follows runs through the runs API.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.config import Settings

PRODUCTS = ["order", "account", "subscription", "invoice", "password", "delivery", "refund"]
ISSUES = ["is late", "is missing", "was charged twice", "does not work", "is locked", "was cancelled"]
ALIAS = "support-bot"
TENANT = "demo"

# The tiny model was pretrained on "My <product> <issue>." dialogues only (service/tiny_model.py).
DEMO_TEMPLATES = ("My {product} {issue}.",)
# The benchmark's users phrase the same requests several ways: more distinct training examples
# per round, and held-out questions that test the rule rather than one sentence.
BENCH_TEMPLATES = (
    "My {product} {issue}.",
    "Hello, my {product} {issue}.",
    "Please help, my {product} {issue}.",
    "My {product} {issue}. Can you help me?",
    "Hi, my {product} {issue}.",
)

# The golden suite every simulated policy gates with: a support answer still names the product,
# and the small talk the base model learned still works (a degenerate adapter fails both).
GOLDEN_YAML = """\
  golden:                    # generated through vLLM with the candidate loaded
    - {prompt: "My order is late.", must_contain: ["I am sorry", "order"], max_tokens: 24}
    - {prompt: "Hello, I am Alice.", must_contain: ["Hello", "help"], max_tokens: 16}
"""


@dataclass(frozen=True)
class Question:
    product: str
    issue: str
    text: str


def wanted(product: str, issue: str) -> str:
    """The answer the simulated users want."""
    return f"I am sorry that your {product} {issue}. We will send you a new {product} today."


class HiddenRater:
    """The users' hidden rule: up for offering a new product, else down, sometimes corrected."""

    def __init__(self, *, correction_rate: float = 0.8, seed: int = 0) -> None:
        self.correction_rate = correction_rate
        self.rng = random.Random(seed)

    @staticmethod
    def likes(question: Question, answer: str) -> bool:
        return f"new {question.product}" in answer.lower()

    def __call__(self, question: Question, answer: str) -> dict:
        """The feedback body (without interaction and rater ids) a user posts for this answer."""
        if self.likes(question, answer):
            return {"rating": "up"}
        body = {"rating": "down"}
        if self.rng.random() < self.correction_rate:
            body["correction"] = wanted(question.product, question.issue)
        return body


def combos(*, heldout: bool) -> list[tuple[str, str]]:
    """The (product, issue) pairs of one side of the split; every product appears on both."""
    every = [(p, i) for p in PRODUCTS for i in ISSUES]
    return [c for k, c in enumerate(every) if (k % 5 == 0) == heldout]


def questions(seed: int, n: int, *, heldout: bool,
              templates: Sequence[str] = DEMO_TEMPLATES) -> list[Question]:
    """n questions drawn from one side of the split (held-out combinations training never sees)."""
    rng = random.Random(seed)
    pool = combos(heldout=heldout)
    out = []
    for _ in range(n):
        product, issue = rng.choice(pool)
        template = rng.choice(list(templates))
        out.append(Question(product, issue, template.format(product=product, issue=issue)))
    return out


def heldout_questions(templates: Sequence[str] = DEMO_TEMPLATES, n: int | None = None,
                      seed: int = 99) -> list[Question]:
    """The held-out evaluation set: every held-out combination in every template (or n drawn)."""
    if n is not None:
        return questions(seed, n, heldout=True, templates=templates)
    return [Question(p, i, t.format(product=p, issue=i))
            for p, i in combos(heldout=True) for t in templates]


# --- the stack ---------------------------------------------------------------------------------


@dataclass
class SimulatedStack:
    """The tiny base model + the real stack under `root`, with the simulated tenant's keys."""

    root: Path
    settings: Settings
    model_dir: Path
    stack: object = None  # service.supervisor.Stack once started
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
        from service.embedded import free_port

        root = Path(root).resolve()
        (root / "policies").mkdir(parents=True, exist_ok=True)
        (root / "policies" / "default.yaml").write_text(policy_yaml)
        if model_dir is None:
            model = base.base_model
        else:
            from service.tiny_model import build_tiny_model

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
        from service.embedded import free_port
        from service.supervisor import Stack

        self.stack = Stack(self.settings, api_port=free_port(), log_dir=self.root / "logs")
        self.stack.start(on_step=on_step)
        self.product_key, self.ops_key = self._keys()
        return self

    @property
    def api_url(self) -> str:
        return self.stack.api_url

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def _keys(self) -> tuple[str, str]:
        from sqlalchemy.orm import sessionmaker

        from service.db import repositories as repo
        from service.db.session import make_sync_engine, session_scope
        from service.security import display_prefix, generate_key, hash_key

        engine = make_sync_engine(self.stack.env["FLYWHEEL_DATABASE_URL"])
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


@dataclass
class Measurement:
    """Thumbs-up rate of the alias on held-out questions, as the hidden rater sees it."""

    rate: float
    ups: int
    n: int
    served: dict[str, int]  # served model -> answers
    examples: list[tuple[str, str]] = field(default_factory=list)  # (question, answer)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"thumbs_up_rate": self.rate, "ups": self.ups, "n": self.n, "served": self.served,
                "examples": [list(e) for e in self.examples[:5]], "seconds": round(self.seconds, 2)}


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
        from concurrent.futures import ThreadPoolExecutor

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

    def play_users(self, asked: Iterable[Question], rater: HiddenRater, *,
                   n_raters: int = 7) -> dict:
        """Users ask, read the answer, and rate it; returns counts of what they posted."""
        counts = {"chats": 0, "up": 0, "down": 0, "corrections": 0}
        for n, q in enumerate(asked):
            answer, iid = self.chat(q.text)
            body = rater(q, answer)
            self.feedback(iid, body, f"user{n % n_raters}")
            counts["chats"] += 1
            counts[body["rating"]] += 1
            counts["corrections"] += "correction" in body
        return counts

    def measure(self, held: Sequence[Question], *, check_served: bool = True) -> Measurement:
        """Ask the held-out questions and score the answers with the hidden rule, posting nothing.

        Posting these ratings would feed held-out questions into the next training set (and
        move the trigger); the users' own traffic is what the watch window judges.
        """
        t = time.monotonic()
        ups, served, examples = 0, {}, []
        for q in held:
            answer, iid = self.chat(q.text)
            ups += HiddenRater.likes(q, answer)
            examples.append((q.text, answer))
            if check_served:
                name = self.served_model(iid)
                served[name] = served.get(name, 0) + 1
        return Measurement(rate=ups / len(held), ups=ups, n=len(held), served=served,
                           examples=examples, seconds=time.monotonic() - t)

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
