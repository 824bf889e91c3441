"""`flywheel demo`: the whole loop on a real chat model, played by a simulated product.

Acme's support bot runs on SmolLM2-135M-Instruct (the embedded default base model). Acme's users
want answers that follow the house rules (service/tasks/support_desk.py: an opening, the product
named, a sign-off), which the base model does not know. They chat, thumb down what breaks the
rules and mostly type the answer they wanted; the trigger starts a run; the worker trains a LoRA
on their corrections; the eval gate checks it; ops approve; the new version is hot-swapped into
the running vLLM. The same held-out questions (products and phrasings users never asked) are
answered before and after, side by side, and the demo fails if the new version is not better.

Workers never import the task: its rule reaches training only through the ratings posted here.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.config import Settings
from service.local.simulation import ALIAS, TENANT, ProductClient, RunFailed, SimulatedStack
from service.tasks import Task, load_task

__all__ = ["ALIAS", "POLICY", "TENANT", "Demo", "DemoFailed", "DemoReport"]

TASK = "support_desk"
TRAFFIC = 40  # chats the users rate (the trigger fires at 36)
HELD_OUT = 12  # test questions answered before and after
RATERS = 8
CONCURRENCY = 12  # the engine batches concurrent chats

# Picked on the task's dev split, never on its test split (FACTS: 24 corrections, 30 steps at
# 3e-4 taught SmolLM2 a fixed opening and sign-off; 9 steps did not).
POLICY = """# Written by `flywheel demo`: SmolLM2-135M-Instruct on 2 CPU cores, minutes per round.
trigger: {min_new_ratings: 36}
training:
  method: sft                # corrections are the answers users asked for
  start_from: base
  learning_rate: 3.0e-4
  epochs: 10
  batch_size: 8
  checkpoint_every_steps: 10
  lora: {r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}
dataset: {heldout_fraction: 0.2, min_examples: 8}
gate:
  min_preference_accuracy: 0.6
  max_nll_regression: 0.05
  golden:                    # generated through vLLM with the candidate loaded; generic on purpose:
    # a fact case ("capital of France" must say Paris) is trained away by users who want every
    # answer in the house rules (BENCHMARKS.md section 1, session 5's support-desk run)
    - {prompt: "Hello! How are you today?", non_empty: true, no_template_tokens: true,
       max_repetition: 0.5, max_tokens: 48}
    - {prompt: "Thanks, that was helpful.", non_empty: true, no_template_tokens: true,
       max_repetition: 0.5, max_tokens: 48}
approval: manual
watch: {window_minutes: 30, min_samples: 20, max_drop: 0.2, alpha: 0.05}
"""


class DemoFailed(RuntimeError):
    """The loop did not close, or the promoted version is not better on held-out questions."""


@dataclass
class DemoReport:
    before: list[tuple[str, str, bool]] = field(default_factory=list)  # question, answer, up
    after: list[tuple[str, str, bool]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    run: dict = field(default_factory=dict)

    @staticmethod
    def rate(rows: list[tuple[str, str, bool]]) -> float:
        return sum(up for *_, up in rows) / len(rows) if rows else 0.0


class Demo:
    def __init__(self, settings: Settings, console: Console, *, keep: bool,
                 task: str = TASK, export: bool = False) -> None:
        self.export = export
        self.console = console
        self.root = (settings.data_dir / "demo").resolve()
        if self.root.exists() and not keep:
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.base_settings = settings
        self.task: Task = load_task(task)
        self.report = DemoReport()
        self.sim: SimulatedStack | None = None

    def step(self, text: str) -> None:
        self.console.print(f"[bold cyan]▸[/bold cyan] {text}")

    def _timed(self, name: str, t0: float) -> None:
        self.report.timings[name] = time.monotonic() - t0

    def run(self) -> DemoReport:
        t0 = time.monotonic()
        self.sim = SimulatedStack.prepare(self.root, self.base_settings, policy_yaml=POLICY,
                                          model_dir=None)
        self.sim.start(on_step=self.step)
        self._timed("start", t0)
        self.step(f"Flywheel API at {self.sim.api_url}; base model {self.sim.model_dir.name}; "
                  f"logs in {self.sim.log_dir}")
        with httpx.Client(base_url=self.sim.api_url, timeout=300) as api:
            self._loop(ProductClient(api, self.sim.product_key, self.sim.ops_key))
        self._timed("total", t0)
        return self.report

    def _held_out(self, client: ProductClient, label: str) -> list[tuple[str, str, bool]]:
        """Answers to the test questions, scored by the users' rule (nothing is posted: held-out
        ratings must never become training data)."""
        t = time.monotonic()
        questions = self.task.prompts("test", HELD_OUT, random.Random(7))
        answers = client.ask_all(questions, max_tokens=self.task.max_tokens,
                                 concurrency=CONCURRENCY)
        rng = random.Random(0)
        rows = [(q[-1]["content"], a, self.task.rate(q, a, rng)[0])
                for q, (a, _) in zip(questions, answers, strict=True)]
        self._timed(f"held_out_{label}", t)
        ups = sum(up for *_, up in rows)
        self.step(f"{label}: {ups}/{len(rows)} held-out answers follow the users' rules")
        return rows

    def _loop(self, client: ProductClient) -> None:
        self.step(f"the base model answers {HELD_OUT} held-out questions (products and "
                  "phrasings the users never ask)")
        self.report.before = self._held_out(client, "base")
        self.step(f"the product chats; {TRAFFIC} users' questions, each rated by its user "
                  "(rules: an opening, the product named, a sign-off), most thumbs-down corrected")
        t = time.monotonic()
        known = {r["id"] for r in client.runs()}
        counts = self._traffic(client)
        self._timed("traffic", t)
        self.step(f"posted {counts['up']} up, {counts['down']} down, "
                  f"{counts['corrections']} corrections")
        run = self._wait_for_run(client, known)
        self.report.run = run
        if run["state"] != "awaiting_approval":
            reasons = (run.get("verdict") or {}).get("reasons") or run.get("failure_reason")
            raise DemoFailed(f"the run ended {run['state']}: {reasons}")
        gate = run["metrics"].get("gate", {})
        training = run["metrics"].get("training", {})
        self.step(f"trained {training.get('steps')} steps on {run['dataset_stats'].get('sft_train', '?')} "
                  f"examples; gate passed: preference accuracy {gate.get('preference_accuracy')}, "
                  f"NLL {gate.get('nll_reference', 0):.3f} → {gate.get('nll_candidate', 0):.3f}; "
                  "awaiting ops approval")
        self.step("ops approve the candidate (POST /v1/runs/{id}/approve with an ops key)")
        t = time.monotonic()
        client.approve(run["id"], "demo: gate passed")
        run = self._wait_state(client, run["id"], {"live", "canary", "failed"}, "deploying")
        if run["state"] == "failed":
            raise DemoFailed(f"deploy failed: {run['failure_reason']}")
        try:
            client.wait_serving(run["candidate_version"])  # past the gateways' routing cache
        except RunFailed as exc:
            raise DemoFailed(str(exc)) from exc
        self._timed("approve_to_live", t)
        self.report.run = run
        swap = run["metrics"].get("deploy", {}).get("timings", {}).get("swap", 0)
        self.step(f"hot-swapped {run['candidate_version']} into the running engine in "
                  f"{swap:.2f}s, no restart")
        self.report.after = self._held_out(client, run["candidate_version"])
        if not self.export:
            self.step(f"edge export: `flywheel export {client.alias} --format gguf --quant q8_0` "
                      "(or `flywheel demo --export`) builds a GGUF checked against the served version")
            return
        t = time.monotonic()
        self._export(client)
        self._timed("export", t)

    def _traffic(self, client: ProductClient) -> dict[str, int]:
        rng = random.Random(1)
        questions = self.task.prompts("train", TRAFFIC, rng)
        answers = client.ask_all(questions, max_tokens=self.task.max_tokens,
                                 concurrency=CONCURRENCY)
        counts = {"up": 0, "down": 0, "corrections": 0}
        for n, (q, (answer, iid)) in enumerate(zip(questions, answers, strict=True)):
            up, correction = self.task.rate(q, answer, rng)
            body = {"rating": "up" if up else "down"}
            if correction:
                body["correction"] = correction
            client.feedback(iid, body, f"user{n % RATERS}")
            counts[body["rating"]] += 1
            counts["corrections"] += correction is not None
        return counts

    def _export(self, client: ProductClient) -> None:
        """Export the promoted version as GGUF for llama.cpp / Ollama; a failure is reported,
        not fatal (the loop itself has closed)."""
        self.step("edge export: the serving version as GGUF q8_0 "
                  f"(POST /v1/adapters/{client.alias}/exports), checked against the served one")
        r = client.api.post(f"/v1/adapters/{client.alias}/exports", headers=client.ops,
                            json={"format": "gguf", "quant": "q8_0", "reason": "demo"})
        r.raise_for_status()
        url = f"/v1/adapters/{client.alias}/exports/{r.json()['id']}"
        deadline = time.monotonic() + 600
        export = r.json()
        while export["status"] in ("queued", "running") and time.monotonic() < deadline:
            self._alive()
            time.sleep(0.5)
            export = client.api.get(url, headers=client.ops).json()
        if export["status"] != "passed":
            self.step(f"[yellow]export {export['status']}:[/yellow] "
                      f"{export.get('failure_reason') or 'timed out'}")
            return
        gate = export["metrics"]["attempts"][-1]["metrics"]
        path = self.root / "artifacts" / "exports" / export["id"] / f"gguf-{export['quant']}"
        self.step(f"export passed: {export['bytes'] / 1e6:.1f} MB, sha256 {export['sha256'][:12]}…, "
                  f"greedy token agreement {gate['decisive_agreement']:.3f}, NLL delta "
                  f"{gate['nll_delta']:+.4f} nats/token; run it with "
                  f"`ollama create {client.alias} -f {path}/Modelfile`")

    def _alive(self) -> None:
        if self.sim and self.sim.dead_children():
            raise DemoFailed(f"{self.sim.dead_children()} exited; see {self.sim.log_dir}")

    def _wait_for_run(self, client: ProductClient, known: set[str]) -> dict:
        try:
            run = client.wait_new_run(known, timeout=60, alive=self._alive)
        except RunFailed as exc:
            raise DemoFailed("no run was created") from exc
        self.step(f"threshold crossed: run {run['id']} created "
                  f"({run['trigger'].get('new_ratings')} new ratings)")
        t = time.monotonic()
        run = self._wait_state(client, run["id"], {"awaiting_approval", "rejected", "failed"},
                               "training")
        self._timed("train_and_gate", t)
        return run

    def _wait_state(self, client: ProductClient, run_id: str, states: set[str], label: str) -> dict:
        with Progress(TextColumn("  {task.description}"), BarColumn(),
                      TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                      console=self.console) as bar:
            task = bar.add_task(label, total=None, detail="")

            def show(run: dict) -> None:
                p = run.get("progress") or {}
                loss, eta = p.get("loss"), p.get("eta_s")
                detail = ""
                if isinstance(loss, (int, float)):
                    detail = f"step {p.get('step')}/{p.get('total_steps')} loss {loss:.3f}"
                    detail += f" ETA {eta:.0f}s" if isinstance(eta, (int, float)) else ""
                bar.update(task, description=run["state"], total=p.get("total_steps"),
                           completed=p.get("step", 0), detail=detail)

            try:
                return client.wait_state(run_id, states | {"failed"}, timeout=1500, on_poll=show,
                                         alive=self._alive, interval=0.5)
            except RunFailed as exc:
                raise DemoFailed(str(exc)) from exc

    def verdict(self) -> None:
        """Raise DemoFailed unless the promoted version beats the base on held-out questions."""
        before, after = self.report.rate(self.report.before), self.report.rate(self.report.after)
        if not self.report.after or after <= before:
            raise DemoFailed(f"the promoted version is not better on held-out questions: "
                             f"{before:.0%} before, {after:.0%} after")

    def side_by_side(self, n: int = 4) -> Table:
        table = Table(title="The same held-out questions, before and after", show_lines=True)
        table.add_column("question", max_width=28)
        table.add_column("base model", max_width=60)
        table.add_column(self.report.run.get("candidate_version") or "promoted", max_width=60)
        pairs = list(zip(self.report.before, self.report.after, strict=False))[:n]
        for (q, a0, up0), (_, a1, up1) in pairs:
            table.add_row(q, f"{'👍' if up0 else '👎'} {a0}", f"{'👍' if up1 else '👎'} {a1}")
        return table

    def summary(self) -> Table:
        table = Table(title="Flywheel demo")
        table.add_column("version")
        table.add_column("held-out thumbs-up")
        r = self.report
        table.add_row("base", f"{r.rate(r.before):.0%} of {len(r.before)}")
        if r.after:
            table.add_row(r.run.get("candidate_version", "promoted"),
                          f"{r.rate(r.after):.0%} of {len(r.after)}")
        return table

    def timings(self) -> str:
        """Seconds per stage, one line."""
        return "time by stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.report.timings.items())

    def stop(self) -> None:
        if self.sim is not None:
            self.sim.stop()
