"""One seed of one task against the running stack: the base, the oracle, and each arm's rounds.

Everything goes through the public API with a product key (chats, feedback) and an ops key
(creating aliases, reading runs): the worker never sees the task, only what users post.
Every alias of a seed answers the same test prompts, so every rate below is comparable.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.learning import raters
from bench.learning.policies import oracle as oracle_policy
from bench.learning.stats import bad_promotions
from service.local.simulation import TENANT, ProductClient, RunFailed, SimulatedStack
from service.tasks import Task

CONCURRENCY = 16  # the engine batches concurrent chats (more tokens per second on CPU)
TERMINAL = {"live", "canary", "rejected", "failed", "awaiting_approval"}
PHASES = {"pending": "queue", "training": "train", "evaluating": "gate",
          "awaiting_approval": "approval", "approved": "swap", "deploying": "swap"}


@dataclass
class Config:
    task: Task
    rounds: int
    per_round: int
    test_n: int
    icl_k: int
    split: str  # "test", or "dev" while tuning
    random_share: float
    inverted_share: float
    oracle: bool
    policy: str  # the loop's policy (the oracle's recipe)
    round_timeout: float
    log: Callable[[str], None]


@dataclass
class Arm:
    """One alias fed by one population of raters."""

    name: str  # "clean" or "poisoned"
    client: ProductClient
    kinds: list[str]
    corrections: list[tuple[list[dict], str]] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)


class PhaseClock:
    """Wall time per run phase, from the states seen while polling."""

    def __init__(self) -> None:
        self.state: str | None = None
        self.since = time.monotonic()
        self.seconds: dict[str, float] = {}

    def __call__(self, run: dict) -> None:
        now = time.monotonic()
        if run["state"] != self.state:
            if self.state in PHASES:
                key = PHASES[self.state]
                self.seconds[key] = self.seconds.get(key, 0.0) + now - self.since
            self.state, self.since = run["state"], now


def slug(text: str) -> str:
    return text.lower().replace("_", "-")


def create_alias(sim: SimulatedStack, api: httpx.Client, alias: str, policy: str | None) -> ProductClient:
    """A fresh alias (serving the base) with its own policy file, and a client for it."""
    if policy is not None:
        (sim.settings.policy_dir / f"{TENANT}--{alias}.yaml").write_text(policy)
    client = ProductClient(api, sim.product_key, sim.ops_key, alias)
    r = api.post("/v1/adapters", headers=client.ops, json={"alias": alias, "description": "bench.learning"})
    if r.status_code not in (201, 409):
        r.raise_for_status()
    return client


def score(client: ProductClient, task: Task, conversations: list[list[dict]], *,
          shots: list[tuple[list[dict], str]] = ()) -> dict:
    """Thumbs-up rate of the alias on these conversations by the users' rule; nothing is posted
    (rated test answers would become training data). `shots` go before each as examples."""
    t = time.monotonic()
    prefix = [m for convo, answer in shots for m in (*convo, {"role": "assistant", "content": answer})]
    answers = client.ask_all([prefix + c for c in conversations], max_tokens=task.max_tokens,
                             concurrency=CONCURRENCY)
    rng = random.Random(0)
    rows = [(c[-1]["content"], a, task.rate(c, a, rng)[0])
            for c, (a, _) in zip(conversations, answers, strict=True)]
    served = Counter(client.served_model(iid) for _, iid in answers)
    ups = sum(up for *_, up in rows)
    return {"rate": ups / len(rows), "ups": ups, "n": len(rows), "served": dict(served),
            "outcomes": [int(up) for *_, up in rows],
            "examples": [list(r) for r in rows[:3]], "seconds": round(time.monotonic() - t, 2)}


def score_offline(scorer, adapter_dir: str, task: Task, conversations: list[list[dict]]) -> dict:
    t = time.monotonic()
    rng = random.Random(0)
    outcomes = [int(task.rate(c, scorer.answer(adapter_dir, c, task.max_tokens), rng)[0])
                for c in conversations]
    ups = sum(outcomes)
    return {"rate": ups / len(conversations), "ups": ups, "n": len(conversations),
            "outcomes": outcomes,
            "scored": "offline (transformers + PEFT)", "seconds": round(time.monotonic() - t, 2)}


class SeedRun:
    """The base, the oracle and every arm for one (task, seed)."""

    def __init__(self, sim: SimulatedStack, api: httpx.Client, cfg: Config, seed: int,
                 arms: list[str], scorer_factory: Callable[[], Any]) -> None:
        self.sim, self.api, self.cfg, self.seed = sim, api, cfg, seed
        self.task = cfg.task
        self.prefix = f"{slug(self.task.name)}-s{seed}"
        self.arm_names = arms
        self._scorer_factory = scorer_factory
        # The same prompts for every arm and the oracle: only the raters differ.
        self.test = self.task.prompts(cfg.split, cfg.test_n, random.Random(10_000 + seed))
        self.train = [self.task.prompts("train", cfg.per_round, random.Random(seed * 100 + k))
                      for k in range(1, cfg.rounds + 1)]

    def alive(self) -> None:
        if self.sim.dead_children():
            raise RunFailed(f"{self.sim.dead_children()} exited; see {self.sim.log_dir}")

    def play(self) -> list[dict]:
        log = self.cfg.log
        base = create_alias(self.sim, self.api, f"{self.prefix}-base", None)
        base_score = score(base, self.task, self.test)
        log(f"{self.prefix}: base {base_score['ups']}/{base_score['n']} on {self.cfg.split}")
        oracle = self._oracle() if self.cfg.oracle else None
        out = []
        for name in self.arm_names:
            share = (0.0, 0.0) if name == "clean" else (self.cfg.random_share, self.cfg.inverted_share)
            kinds = raters.assign(raters.RATERS, random_share=share[0], inverted_share=share[1],
                                  rng=random.Random(self.seed))
            arm = Arm(name, create_alias(self.sim, self.api, f"{self.prefix}-{name}", None), kinds)
            last = base_score
            for k in range(1, self.cfg.rounds + 1):
                row = self._round(arm, k, last, base)
                arm.rounds.append(row)
                last = row["serving"]
            out.append({"task": self.task.name, "seed": self.seed, "arm": name, "raters": kinds,
                        "split": self.cfg.split, "base": base_score, "oracle": oracle,
                        "rounds": arm.rounds,
                        "bad_promotions": bad_promotions(base_score["rate"], arm.rounds),
                        "bad_candidates": bad_candidates(arm.rounds)})
        return out

    def _oracle(self) -> dict:
        """An adapter trained on the wanted answers to every train prompt of this seed."""
        if self.task.wanted is None:
            return {"skipped": f"task {self.task.name} defines no WANTED"}
        prompts = [c for batch in self.train for c in batch]
        client = create_alias(self.sim, self.api, f"{self.prefix}-oracle",
                              oracle_policy(len(prompts), self.cfg.rounds, self.cfg.policy))
        t = time.monotonic()
        known = {r["id"] for r in client.runs()}
        answers = client.ask_all(prompts, max_tokens=self.task.max_tokens, concurrency=CONCURRENCY)
        for n, (c, (_, iid)) in enumerate(zip(prompts, answers, strict=True)):
            client.feedback(iid, {"rating": "down", "correction": self.task.wanted(c)},
                            f"user{n % raters.RATERS}")
        run = client.wait_new_run(known, timeout=120, alive=self.alive)
        run = client.wait_state(run["id"], {"live", "canary", "rejected", "failed"},
                                timeout=self.cfg.round_timeout, alive=self.alive, interval=1)
        if run["state"] not in ("live", "canary"):  # reported, not fatal: the arms still run
            reason = client.run(run["id"]).get("failure_reason")
            self.cfg.log(f"{self.prefix}: the oracle's run ended {run['state']}: {reason}")
            return {"failed": f"the oracle's run ended {run['state']}: {reason}"}
        client.wait_serving(run["candidate_version"], timeout=60)
        result = score(client, self.task, self.test)
        result.update(version=run["candidate_version"], examples_trained=len(prompts),
                      seconds_total=round(time.monotonic() - t, 1))
        self.cfg.log(f"{self.prefix}: oracle {result['ups']}/{result['n']}")
        return result

    def _round(self, arm: Arm, k: int, last: dict, base: ProductClient) -> dict:
        cfg, task, client = self.cfg, self.task, arm.client
        t_round = time.monotonic()
        before = {r["id"]: r["state"] for r in client.runs()}
        seconds: dict[str, float] = {}

        t = time.monotonic()
        asked = self.train[k - 1]
        answers = client.ask_all(asked, max_tokens=task.max_tokens, concurrency=CONCURRENCY)
        rng = random.Random(self.seed * 1000 + k)
        traffic = Counter()
        for n, (c, (answer, iid)) in enumerate(zip(asked, answers, strict=True)):
            kind = arm.kinds[n % raters.RATERS]
            up, correction = raters.rate_as(kind, task, c, answer, rng)
            body = {"rating": "up" if up else "down"}
            if correction:
                body["correction"] = correction
                arm.corrections.append((c, correction))
            client.feedback(iid, body, f"user{n % raters.RATERS}")
            traffic["chats"] += 1
            traffic[body["rating"]] += 1
            traffic["corrections"] += correction is not None
            traffic[f"{kind}_votes"] += 1
        seconds["traffic"] = time.monotonic() - t

        run = client.wait_new_run(set(before), timeout=120, alive=self.alive)
        clock = PhaseClock()
        run = client.wait_state(run["id"], TERMINAL, timeout=cfg.round_timeout, on_poll=clock,
                                alive=self.alive, interval=0.5)
        if run["state"] == "awaiting_approval":  # a --policy with manual approval: ops approve
            client.approve(run["id"], "bench.learning: gate passed")
            run = client.wait_state(run["id"], {"live", "canary", "failed"}, on_poll=clock,
                                    timeout=cfg.round_timeout, alive=self.alive, interval=0.5)
        clock({"state": "_done"})
        detail = client.run(run["id"])
        promoted = detail["state"] in ("live", "canary")
        if promoted:
            client.wait_serving(detail["candidate_version"], timeout=60)
        stats = detail.get("dataset_stats") or {}
        seconds.update(clock.seconds)
        for stage in ("queue", "train", "gate", "swap"):  # a state shorter than one poll: ~0
            seconds.setdefault(stage, 0.0)
        if "train" in seconds and isinstance(stats.get("build_seconds"), (int, float)):
            seconds["dataset"] = stats["build_seconds"]
            seconds["train"] -= stats["build_seconds"]

        # The watch window judged the version that served this round's users: did it roll back?
        rolled = [r["candidate_version"] for r in client.runs()
                  if before.get(r["id"]) in ("live", "canary") and r["state"] == "rolled_back"]
        serving = score(client, task, self.test)
        seconds["measure"] = serving["seconds"]
        shots = self._shots(arm, k)
        icl = score(base, task, self.test, shots=shots)
        icl["shots"] = len(shots)
        seconds["icl"] = icl["seconds"]
        row: dict[str, Any] = {
            "round": k, "traffic": dict(traffic), "run_id": detail["id"],
            "candidate": detail["candidate_version"], "parent": detail["parent_version"] or "base",
            "state": detail["state"], "promoted": promoted, "method": detail["method"],
            "failure_reason": detail.get("failure_reason"), "rolled_back": rolled,
            "dataset": {key: stats.get(key) for key in
                        ("train_items", "heldout_items", "replay", "ups", "downs", "corrections",
                         "sft_train", "dropped_duplicates", "dropped_rater_cap", "raters")},
            "training": {key: (detail["metrics"].get("training") or {}).get(key)
                         for key in ("steps", "final_loss", "seconds")},
            "gate": gate_summary(detail),
            "serving_before": {key: last[key] for key in ("rate", "ups", "n", "outcomes")},
            "serving": serving, "icl": icl,
        }
        artifact = (detail.get("lineage") or {}).get("artifact_path")
        if promoted:
            row["candidate_test"] = {key: serving[key] for key in ("rate", "ups", "n")}
        elif artifact and Path(artifact).exists():
            row["candidate_test"] = score_offline(self._scorer_factory(), artifact, task, self.test)
            seconds["offline_score"] = row["candidate_test"]["seconds"]
        seconds["round"] = time.monotonic() - t_round - seconds.get("offline_score", 0.0)
        row["seconds"] = {key: round(v, 2) for key, v in seconds.items()}
        cand = row.get("candidate_test", {}).get("rate")
        self.cfg.log(
            f"{self.prefix}-{arm.name} round {k}: {detail['candidate_version']} {detail['state']}"
            f"{' (gate: ' + '; '.join(row['gate']['reasons']) + ')' if row['gate']['reasons'] else ''}; "
            f"serving {serving['ups']}/{serving['n']}, icl {icl['ups']}/{icl['n']}"
            f"{f', candidate {cand:.0%}' if cand is not None else ''}"
            f"{f'; rolled back {rolled}' if rolled else ''} ({row['seconds']['round']:.0f}s)")
        return row

    def _shots(self, arm: Arm, k: int) -> list[tuple[list[dict], str]]:
        """The in-context examples: k corrected answers from this arm's feedback so far, on
        distinct prompts, drawn by the seed (the same feedback the loop trains on)."""
        distinct = {c[-1]["content"]: (c, answer) for c, answer in arm.corrections}
        pool = sorted(distinct.values(), key=lambda x: x[0][-1]["content"])
        rng = random.Random(self.seed * 7919 + k)
        return rng.sample(pool, min(self.cfg.icl_k, len(pool)))


def gate_summary(detail: dict) -> dict:
    verdict = detail.get("verdict") or {}
    gate = (detail.get("metrics") or {}).get("gate") or {}
    golden = (detail.get("metrics") or {}).get("golden") or []
    return {"passed": verdict.get("passed"), "reasons": verdict.get("reasons") or [],
            "notes": verdict.get("notes") or [],
            "metrics": {key: gate.get(key) for key in
                        ("preference_accuracy", "n_preference", "nll_reference", "nll_candidate",
                         "nll_base", "n_nll", "answer_wins", "answer_losses", "answer_ties",
                         "answer_win_rate")},
            "golden": [{"prompt": g["prompt"], "passed": g["passed"]} for g in golden]}


def bad_candidates(rounds: list[dict]) -> list[dict]:
    """Candidates that scored lower on test than what served when they were built, and what
    stopped each (the gate, the watch window's rollback) or that nothing did."""
    out = []
    for k, r in enumerate(rounds):
        cand = r.get("candidate_test")
        if cand is None or cand["rate"] >= r["serving_before"]["rate"]:
            continue
        later_rollback = any(r["candidate"] in x.get("rolled_back", []) for x in rounds[k + 1:])
        if not r["promoted"]:
            stopped = "gate: " + "; ".join(r["gate"]["reasons"]) if r["state"] == "rejected" \
                else f"run {r['state']}: {r.get('failure_reason')}"
        elif later_rollback:
            stopped = "promoted, then rolled back by the watch window"
        else:
            stopped = "nothing: promoted"
        out.append({"round": r["round"], "version": r["candidate"], "rate": cand["rate"],
                    "serving_rate": r["serving_before"]["rate"], "stopped_by": stopped})
    return out
