"""`flywheel demo`: the whole loop on embedded servers, played by a simulated product.

A support bot answers "My <product> <issue>." questions. Its users (a hidden rule the training
code never sees, in service/simulation.py) want "... We will send you a new <product> today."
They thumb up answers that offer a new product, and thumb down the rest, often with that
correction. The demo shows the base model's thumbs-up rate, the retrain, the gate, an ops
approval, the hot-swap, and the rate of the new version on held-out questions.

The product, the rater and the stack are shared with the learning benchmark
(`python -m bench.sim_product`), which plays several rounds of the same loop.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.config import Settings
from service.simulation import (
    ALIAS,
    DEMO_TEMPLATES,
    GOLDEN_YAML,
    TENANT,
    HiddenRater,
    ProductClient,
    RunFailed,
    SimulatedStack,
    heldout_questions,
    questions,
)

__all__ = ["ALIAS", "POLICY", "PRETRAIN_STEPS", "TENANT", "Demo", "DemoReport"]

# Enough pretraining for fluent support answers ("I am sorry that your order is late. We will
# check your order now."): ~40 s on two idle cores, cached under the data dir afterwards.
PRETRAIN_STEPS = 400

# Tuned offline (bench/sim_product.py documents how): with the 400-step base, SFT on ~15
# distinct corrections for 100 steps at 1e-3 learns the users' answer for held-out questions
# too; 30 steps at 2e-3 left it half-learned ("We will send you ne ne ...").
POLICY = """# Written by `flywheel demo`: small numbers so the loop turns in minutes on a CPU.
trigger: {min_new_ratings: 40}
training:
  method: sft                # corrections are the targets users asked for
  learning_rate: 1.0e-3
  max_steps: 100
  batch_size: 8
  checkpoint_every_steps: 25
  lora: {r: 8, alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj]}
dataset: {heldout_fraction: 0.2, min_examples: 4}
gate:
  min_preference_accuracy: 0.5
  max_nll_regression: 0.05
""" + GOLDEN_YAML + """approval: manual
watch: {window_minutes: 30, min_samples: 20, max_drop: 0.2, alpha: 0.05}
"""


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
        self.base_settings = settings
        self.report = DemoReport()
        self.sim: SimulatedStack | None = None

    def step(self, text: str) -> None:
        self.console.print(f"[bold cyan]▸[/bold cyan] {text}")

    def run(self) -> DemoReport:
        t0 = time.monotonic()
        self.step("building a tiny Llama model and tokenizer locally (no download)")
        self.sim = SimulatedStack.prepare(
            self.root, self.base_settings, policy_yaml=POLICY, pretrain_steps=PRETRAIN_STEPS,
            model_dir=self.base_settings.data_dir.resolve() / "tiny-model-demo")
        self.report.timings["model"] = time.monotonic() - t0
        t = time.monotonic()
        self.sim.start(on_step=self.step)
        self.report.timings["stack"] = time.monotonic() - t
        self.step(f"Flywheel API at {self.sim.api_url}; logs in {self.sim.log_dir}")
        with httpx.Client(base_url=self.sim.api_url, timeout=120) as api:
            self._loop(ProductClient(api, self.sim.product_key, self.sim.ops_key))
        self.report.timings["total"] = time.monotonic() - t0
        return self.report

    def _evaluate(self, client: ProductClient, label: str) -> dict:
        """Thumbs-up rate on held-out questions, scored by the hidden rule (nothing is posted)."""
        m = client.measure(heldout_questions(DEMO_TEMPLATES, n=20), check_served=False)
        result = {"version": label, "thumbs_up_rate": m.rate, "n": m.n, "example": m.examples[0]}
        self.report.rounds.append(result)
        self.step(f"{label}: thumbs-up rate on held-out questions {m.ups}/{m.n}; "
                  f"e.g. {m.examples[0][0]!r} → {m.examples[0][1]!r}")
        return result

    def _loop(self, client: ProductClient) -> None:
        self._evaluate(client, "base")
        self.step("the product chats and its users rate the answers (hidden rule: offer a new product)")
        t = time.monotonic()
        known = {r["id"] for r in client.runs()}
        client.play_users(questions(1, 40, heldout=False), HiddenRater(correction_rate=0.8, seed=1))
        self.report.timings["traffic"] = time.monotonic() - t
        run = self._wait_for_run(client, known)
        self.report.run = run
        if run["state"] != "awaiting_approval":
            raise RuntimeError(f"the run ended {run['state']}: {run.get('verdict') or run.get('failure_reason')}")
        gate = run["metrics"].get("gate", {})
        self.step(f"gate passed: preference accuracy {gate.get('preference_accuracy')}, "
                  f"NLL {gate.get('nll_reference'):.3f} → {gate.get('nll_candidate'):.3f}; "
                  f"awaiting ops approval")
        self.step("ops approve the candidate (POST /v1/runs/{id}/approve with an ops key)")
        t = time.monotonic()
        client.approve(run["id"], "demo: gate passed")
        run = self._wait_state(client, run["id"], {"live", "canary", "failed"}, "deploying")
        if run["state"] == "failed":
            raise RuntimeError(f"deploy failed: {run['failure_reason']}")
        self.report.timings["approve_to_live"] = time.monotonic() - t
        self.report.run = run
        deploy = run["metrics"].get("deploy", {})
        self.step(f"hot-swapped {run['candidate_version']} into the running engine in "
                  f"{deploy.get('timings', {}).get('swap', 0):.2f}s, no restart")
        try:
            client.wait_serving(run["candidate_version"])  # past the gateways' routing cache
        except RunFailed as exc:
            raise RuntimeError(str(exc)) from exc
        self._evaluate(client, run["candidate_version"])
        t = time.monotonic()
        self._export(client)
        self.report.timings["export"] = time.monotonic() - t

    def _export(self, client: ProductClient) -> None:
        """Export the promoted version as GGUF for llama.cpp / Ollama; a failure is reported,
        not fatal (the loop itself has closed)."""
        self.step("edge export: the serving version as GGUF q8_0 "
                  f"(POST /v1/adapters/{client.alias}/exports), checked against the served one")
        r = client.api.post(f"/v1/adapters/{client.alias}/exports", headers=client.ops,
                            json={"format": "gguf", "quant": "q8_0", "reason": "demo"})
        r.raise_for_status()
        url = f"/v1/adapters/{client.alias}/exports/{r.json()['id']}"
        deadline = time.monotonic() + 300
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
            raise RuntimeError(f"{self.sim.dead_children()} exited; see {self.sim.log_dir}")

    def _wait_for_run(self, client: ProductClient, known: set[str]) -> dict:
        try:
            run = client.wait_new_run(known, timeout=30, alive=self._alive)
        except RunFailed as exc:
            raise RuntimeError("no run was created") from exc
        self.step(f"threshold crossed: run {run['id']} created "
                  f"({run['trigger'].get('new_ratings')} new ratings)")
        t = time.monotonic()
        run = self._wait_state(client, run["id"], {"awaiting_approval", "rejected", "failed"}, "training")
        self.report.timings["train_and_gate"] = time.monotonic() - t
        return run

    def _wait_state(self, client: ProductClient, run_id: str, states: set[str], label: str) -> dict:
        with Progress(TextColumn("  {task.description}"), BarColumn(),
                      TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                      console=self.console) as bar:
            task = bar.add_task(label, total=None, detail="")

            def show(run: dict) -> None:
                p = run.get("progress") or {}
                loss = p.get("loss")
                bar.update(task, description=run["state"], total=p.get("total_steps"),
                           completed=p.get("step", 0),
                           detail=(f"step {p.get('step')}/{p.get('total_steps')} loss {loss:.3f}"
                                   if isinstance(loss, (int, float)) else ""))

            try:
                return client.wait_state(run_id, states | {"failed"}, timeout=900, on_poll=show,
                                         alive=self._alive, interval=0.5)
            except RunFailed as exc:
                raise RuntimeError(str(exc)) from exc

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
        if self.sim is not None:
            self.sim.stop()
