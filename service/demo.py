"""`flywheel demo`: the whole loop on embedded servers, played by a simulated product.

A support bot answers "My <product> <issue>." questions. Its users (a hidden rule the training
code never sees) want "... We will send you a new <product> today." They thumb up answers that
offer a new product, and thumb down the rest, often with that correction. The demo shows the
base model's thumbs-up rate, the retrain, the gate, an ops approval, the hot-swap, and the rate
of the new version on held-out questions.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.config import Settings
from service.db import repositories as repo
from service.db.session import make_sync_engine, session_scope
from service.embedded import free_port
from service.security import display_prefix, generate_key, hash_key
from service.supervisor import Stack

# The tiny model was pretrained on these support dialogues, so its base answers are fluent.
PRODUCTS = ["order", "account", "subscription", "invoice", "password", "delivery", "refund"]
ISSUES = ["is late", "is missing", "was charged twice", "does not work", "is locked", "was cancelled"]
ALIAS = "support-bot"
TENANT = "demo"

POLICY = """# Written by `flywheel demo`: small numbers so the loop turns in minutes on a CPU.
trigger: {min_new_ratings: 40}
training:
  method: sft                # corrections are the targets users asked for
  learning_rate: 2.0e-3
  max_steps: 30
  batch_size: 8
  checkpoint_every_steps: 10
  lora: {r: 8, alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj]}
dataset: {heldout_fraction: 0.2, min_examples: 4}
gate:
  min_preference_accuracy: 0.5
  max_nll_regression: 0.05
  golden:                    # generated through vLLM with the candidate loaded
    - {prompt: "My order is late.", must_contain: ["I am sorry", "order"], max_tokens: 24}
    - {prompt: "Hello, I am Alice.", must_contain: ["Hello", "help"], max_tokens: 16}
approval: manual
watch: {window_minutes: 30, min_samples: 20, max_drop: 0.2, alpha: 0.05}
"""


def wanted(product: str, issue: str) -> str:
    return f"I am sorry that your {product} {issue}. We will send you a new {product} today."


def rate(product: str, issue: str, answer: str, rng: random.Random) -> dict:
    """The hidden rater: up for offering a new product, else down, often with a correction."""
    if f"new {product}" in answer.lower():
        return {"rating": "up"}
    body = {"rating": "down"}
    if rng.random() < 0.8:
        body["correction"] = wanted(product, issue)
    return body


def questions(seed: int, n: int, *, heldout: bool) -> list[tuple[str, str, str]]:
    """(product, issue, question); held-out questions use combinations training never sees."""
    rng = random.Random(seed)
    combos = [(p, i) for p in PRODUCTS for i in ISSUES]
    pool = [c for k, c in enumerate(combos) if (k % 5 == 0) == heldout]
    return [(p, i, f"My {p} {i}.") for p, i in (rng.choice(pool) for _ in range(n))]


@dataclass
class DemoReport:
    rounds: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    run: dict = field(default_factory=dict)


class Demo:
    def __init__(self, settings: Settings, console: Console, *, keep: bool) -> None:
        self.console = console
        self.root = (settings.data_dir / "demo").resolve()
        if self.root.exists() and not keep:
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "policies").mkdir(exist_ok=True)
        (self.root / "policies" / "default.yaml").write_text(POLICY)
        self.base_settings = settings
        self.report = DemoReport()
        self.stack: Stack | None = None

    def step(self, text: str) -> None:
        self.console.print(f"[bold cyan]▸[/bold cyan] {text}")

    def run(self) -> DemoReport:
        t0 = time.monotonic()
        from service.tiny_model import build_tiny_model

        self.step("building a tiny Llama model and tokenizer locally (no download)")
        model_dir = build_tiny_model(self.base_settings.data_dir.resolve() / "tiny-model-demo",
                                     pretrain_steps=150)
        self.report.timings["model"] = time.monotonic() - t0
        settings = self.base_settings.model_copy(update={
            "data_dir": self.root, "base_model": str(model_dir), "vllm_urls": None,
            "policy_dir": self.root / "policies", "artifact_dir": self.root / "artifacts",
            "vllm_port": free_port(), "database_url": self.base_settings.database_url,
            "broker_url": self.base_settings.broker_url})
        t = time.monotonic()
        self.stack = Stack(settings, api_port=free_port(), log_dir=self.root / "logs")
        self.stack.start(on_step=self.step)
        self.report.timings["stack"] = time.monotonic() - t
        self.step(f"Flywheel API at {self.stack.api_url}; logs in {self.root / 'logs'}")
        product_key, ops_key = self._keys()
        with httpx.Client(base_url=self.stack.api_url, timeout=120) as api:
            self._loop(api, product_key, ops_key)
        self.report.timings["total"] = time.monotonic() - t0
        return self.report

    def _keys(self) -> tuple[str, str]:
        from sqlalchemy.orm import sessionmaker

        engine = make_sync_engine(self.stack.env["FLYWHEEL_DATABASE_URL"])
        keys = []
        with session_scope(sessionmaker(engine)) as s:
            repo.ensure_adapter(s, TENANT, ALIAS, "the demo's support bot")
            for role in ("product", "ops"):
                key = generate_key()
                repo.create_api_key(s, tenant_id=TENANT, role=role, key_hash=hash_key(key),
                                    prefix=display_prefix(key), name=f"demo {role}")
                keys.append(key)
        engine.dispose()
        return keys[0], keys[1]

    def _chat(self, api: httpx.Client, key: str, question: str) -> tuple[str, str]:
        r = api.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json={
            "model": ALIAS, "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "user", "content": question}]})
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"] or "", r.headers["x-interaction-id"]

    def _evaluate(self, api, key, label: str) -> dict:
        """Thumbs-up rate on held-out questions (rated, so the watch window sees them too)."""
        rng = random.Random(7)
        ups, examples = 0, []
        held = questions(99, 20, heldout=True)
        for product, issue, q in held:
            answer, iid = self._chat(api, key, q)
            verdict = rate(product, issue, answer, rng)
            ups += verdict["rating"] == "up"
            api.post("/v1/feedback", headers={"Authorization": f"Bearer {key}"},
                     json={"interaction_id": iid, "rater_id": f"eval-{label}", **verdict})
            examples.append((q, answer))
        result = {"version": label, "thumbs_up_rate": ups / len(held), "n": len(held),
                  "example": examples[0]}
        self.report.rounds.append(result)
        self.step(f"{label}: thumbs-up rate on held-out questions {ups}/{len(held)}; "
                  f"e.g. {examples[0][0]!r} → {examples[0][1]!r}")
        return result

    def _loop(self, api: httpx.Client, key: str, ops: str) -> None:
        self._evaluate(api, key, "base")
        self.step("the product chats and its users rate the answers (hidden rule: offer a new product)")
        rng = random.Random(1)
        t = time.monotonic()
        for n, (product, issue, q) in enumerate(questions(1, 40, heldout=False)):
            answer, iid = self._chat(api, key, q)
            api.post("/v1/feedback", headers={"Authorization": f"Bearer {key}"},
                     json={"interaction_id": iid, "rater_id": f"user{n % 7}",
                           **rate(product, issue, answer, rng)}).raise_for_status()
        self.report.timings["traffic"] = time.monotonic() - t
        run = self._wait_for_run(api, ops)
        self.report.run = run
        if run["state"] != "awaiting_approval":
            raise RuntimeError(f"the run ended {run['state']}: {run.get('verdict') or run.get('failure_reason')}")
        gate = run["metrics"].get("gate", {})
        self.step(f"gate passed: preference accuracy {gate.get('preference_accuracy')}, "
                  f"NLL {gate.get('nll_reference'):.3f} → {gate.get('nll_candidate'):.3f}; "
                  f"awaiting ops approval")
        self.step("ops approve the candidate (POST /v1/runs/{id}/approve with an ops key)")
        t = time.monotonic()
        api.post(f"/v1/runs/{run['id']}/approve", headers={"Authorization": f"Bearer {ops}"},
                 json={"reason": "demo: gate passed"}).raise_for_status()
        run = self._wait_state(api, ops, run["id"], {"live", "canary", "failed"}, "deploying")
        if run["state"] == "failed":
            raise RuntimeError(f"deploy failed: {run['failure_reason']}")
        self.report.timings["approve_to_live"] = time.monotonic() - t
        self.report.run = run
        deploy = run["metrics"].get("deploy", {})
        self.step(f"hot-swapped {run['candidate_version']} into the running engine in "
                  f"{deploy.get('timings', {}).get('swap', 0):.2f}s, no restart")
        time.sleep(2)  # past the gateways' routing cache bound
        self._evaluate(api, key, run["candidate_version"])

    def _wait_for_run(self, api, ops) -> dict:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            runs = api.get("/v1/runs", headers={"Authorization": f"Bearer {ops}"},
                           params={"alias": ALIAS}).json()
            if runs:
                self.step(f"threshold crossed: run {runs[0]['id']} created "
                          f"({runs[0]['trigger'].get('new_ratings')} new ratings)")
                t = time.monotonic()
                run = self._wait_state(api, ops, runs[0]["id"],
                                       {"awaiting_approval", "rejected", "failed"}, "training")
                self.report.timings["train_and_gate"] = time.monotonic() - t
                return run
            time.sleep(0.5)
        raise RuntimeError("no run was created")

    def _wait_state(self, api, ops, run_id: str, states: set[str], label: str) -> dict:
        with Progress(TextColumn("  {task.description}"), BarColumn(),
                      TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                      console=self.console) as bar:
            task = bar.add_task(label, total=None, detail="")
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                run = api.get(f"/v1/runs/{run_id}", headers={"Authorization": f"Bearer {ops}"}).json()
                p = run.get("progress") or {}
                loss = p.get("loss")
                bar.update(task, description=run["state"], total=p.get("total_steps"),
                           completed=p.get("step", 0),
                           detail=(f"step {p.get('step')}/{p.get('total_steps')} loss {loss:.3f}"
                                   if isinstance(loss, (int, float)) else ""))
                if run["state"] in states:
                    return run
                if self.stack and self.stack.dead_children():
                    raise RuntimeError(f"{self.stack.dead_children()} exited; see {self.root / 'logs'}")
                time.sleep(0.5)
        raise RuntimeError(f"run {run_id} did not reach {states}")

    def summary(self) -> Table:
        table = Table(title="Flywheel demo")
        table.add_column("version")
        table.add_column("thumbs-up (held-out)")
        table.add_column("example answer")
        for r in self.report.rounds:
            table.add_row(r["version"], f"{r['thumbs_up_rate']:.0%} of {r['n']}", r["example"][1][:60])
        gate = self.report.run.get("metrics", {}).get("gate", {})
        timing = ", ".join(f"{k} {v:.0f}s" for k, v in self.report.timings.items())
        table.caption = (f"method {self.report.run.get('method')}; gate: preference accuracy "
                         f"{gate.get('preference_accuracy')}, reward margin "
                         f"{gate.get('reward_margin', 0):.2f}; timings: {timing}")
        return table

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()
