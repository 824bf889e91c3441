"""Learning benchmark: a simulated product drives the real loop for K rounds.

    /root/.cache/flywheel/venv/bin/python -m bench.sim_product                  # 3 rounds
    /root/.cache/flywheel/venv/bin/python -m bench.sim_product --rounds 5 --per-round 48
    /root/.cache/flywheel/venv/bin/python -m bench.sim_product --policy my.yaml  # other knobs

What runs: the real stack on a fresh temp data dir (embedded Postgres + Redis, a managed vLLM,
the API, a Celery worker and beat: service.supervisor.Stack), serving a tiny Llama model
pretrained for a few hundred steps on the synthetic corpus (service/tiny_model.py; cached under
~/.cache/flywheel, ~40 s to build on two idle cores).

The product (service/simulation.py) is a support bot. Users ask "<template> <product> <issue>"
questions; a hidden rater, which lives only in service/simulation.py (nothing under workers/
imports it, and the training code sees only what the product posts through the public API),
wants "I am sorry that your <product> <issue>. We will send you a new <product> today." It
thumbs up an answer that offers a new <product>, else thumbs down, with that answer as a
correction some of the time (--correction-rate). A fixed fifth of the (product, issue)
combinations is held out: users never ask them, and every round's held-out rate is measured on
all of them in every phrasing, through the gateway, rated by the hidden rule and never posted
(posting would leak held-out questions into the next training set).

Round 0 measures the base model. Each round k >= 1: --per-round users chat through the gateway
with the alias and rate the answers; their ratings cross the policy's trigger (min_new_ratings =
--per-round), the API creates a run, the Celery worker builds the dataset (new ratings + replay
of earlier good ones) and trains a LoRA starting from the serving version, the eval gate scores
it against the serving version (held-out ratings, NLL, golden suite through vLLM), approval is
automatic (policy `approval: auto`: this loop runs unattended; the gate is the only judge), the
worker hot-swaps it into vLLM, and the held-out rate is measured again through the gateway. The
watch window stays on: the next round's users rate the new version, and a significant drop
rolls it back by itself (reported in the table).

Each candidate's held-out rate is also computed offline (transformers + PEFT from its artifact,
greedy, same questions), so a rejected candidate shows what the gate kept out, and "no bad
candidate promoted" is checked: every promoted version's served held-out rate must be at least
its predecessor's.

Prints a markdown table per round and writes bench/results/sim_product-<utc time>.json. Times
are wall seconds seen by polling the run: "train" covers the pending and training states (dataset,
model load, training), "gate" evaluating, "swap" approved + deploying; "round" runs from the
first chat to the end of the held-out measurement (minus the benchmark's own offline scoring).
The machine's other load shows in all of them.

--offline plays the same rounds with no servers (transformers answers instead of vLLM, the same
dataset builder, trainer, offline gate metrics, golden checks and gate decision) in well under a
minute: the way to tune a policy before spending a real run on it (--policy FILE).

Tuning (offline, then confirmed by real runs; 3 rounds, 48 chats a round, half the thumbs-down
corrected): the 400-step base answers fluently ("I am sorry that your order is late. We will
check your order now.", 0% thumbs-up), so the adapter only has to change the offer. Each round
yields ~12-25 distinct SFT examples after de-duplication, the 20% held-out split and the rater
cap. 30 steps at 2e-3 (the demo's first policy) stopped half way ("We will send you ne ne ...",
0% held-out); 60 steps at 2e-3 or 3e-3, or 100 at 1e-3, reach 80-100% after one round. Once
the serving version is good, a further round (continuing its adapter with a fresh optimizer)
tends to nudge held-out NLL up by a few hundredths: at 2e-3/3e-3 that crossed the gate's 5%
relative tolerance in round 3 in 3 of 4 offline runs, at 1e-3 in 0 of 2 offline and 2 of 3 real
runs (candidates within two points of the serving one, either side: the serving one stays).
Rank 16 (alpha 32) learned no faster; LoRA on the MLP too learned a little faster but was no
steadier later. Method auto picks DPO for round 1 (every answer is down, most corrected):
its loss went to 0 while greedy answers did not change (0% after two rounds, then degenerate
small talk, which the golden suite rejects), so the policy says sft.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from service.config import Settings
from service.simulation import (
    BENCH_TEMPLATES,
    GOLDEN_YAML,
    HiddenRater,
    ProductClient,
    RunFailed,
    SimulatedStack,
    heldout_questions,
    questions,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL_CACHE = Path.home() / ".cache" / "flywheel"
PRETRAIN_STEPS = 400

# The tuned policy (see "Tuning" above). SFT: the corrections are exactly the
# answers users want, and thumbs-up answers of later rounds are more of them; DPO on the same
# pairs drove its loss to 0 without changing what greedy decoding says. 100 steps at 1e-3 on
# LoRA r=8 over the attention projections learns the rule from ~15 distinct examples without
# degrading small talk; replay keeps earlier rounds' good answers in each training set.
POLICY = """# Written by bench/sim_product.py.
trigger: {{min_new_ratings: {per_round}}}
training:
  method: sft
  start_from: serving
  learning_rate: 1.0e-3
  max_steps: 100
  batch_size: 8
  checkpoint_every_steps: 50
  lora: {{r: 8, alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj]}}
dataset: {{heldout_fraction: 0.2, replay_fraction: 0.2, min_examples: 4}}
gate:
  min_preference_accuracy: 0.5
  max_nll_regression: 0.05
{golden}approval: auto
watch: {{window_minutes: 30, min_samples: 20, max_drop: 0.2, alpha: 0.05}}
"""

PHASES = {"pending": "queue", "training": "train", "evaluating": "gate", "awaiting_approval": "approval",
          "approved": "swap", "deploying": "swap"}


def policy_yaml(per_round: int) -> str:
    return POLICY.format(per_round=per_round, golden=GOLDEN_YAML)


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


class OfflineScorer:
    """Greedy answers of the base model or an adapter artifact with transformers (no vLLM)."""

    def __init__(self, base_model: Path, max_tokens: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_model, self.max_tokens = str(base_model), max_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        self._load = lambda: AutoModelForCausalLM.from_pretrained(self.base_model).eval()
        self._cache: tuple[str | None, Any] | None = None

    def _model(self, adapter_dir: str | None):
        if self._cache is None or self._cache[0] != adapter_dir:
            from peft import PeftModel

            model = self._load()
            if adapter_dir is not None:
                model = PeftModel.from_pretrained(model, adapter_dir).eval()
            self._cache = (adapter_dir, model)
        return self._cache[1]

    def generate(self, adapter_dir: str | None, prompt: str, max_tokens: int | None = None) -> str:
        import torch

        model = self._model(adapter_dir)
        ids = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
            return_dict=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens or self.max_tokens, do_sample=False)
        return self.tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)

    def answers(self, adapter_dir: str | None, asked) -> tuple[float, list[str]]:
        """(share the hidden rule likes, answers) for these questions."""
        out = [self.generate(adapter_dir, q.text) for q in asked]
        return sum(HiddenRater.likes(q, a) for q, a in zip(asked, out, strict=True)) / len(asked), out

    def rate(self, adapter_dir: str, held) -> float:
        return self.answers(adapter_dir, held)[0]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def play_round(k: int, client: ProductClient, sim: SimulatedStack, args, held,
               scorer: OfflineScorer | None) -> dict:
    """One round: traffic → trigger → train → gate → (auto) approval → swap → held-out rate."""
    t_round = time.monotonic()
    row: dict[str, Any] = {"round": k}

    def alive() -> None:
        if sim.dead_children():
            raise RunFailed(f"{sim.dead_children()} exited; see {sim.log_dir}")

    before = {r["id"]: r["state"] for r in client.runs()}
    known = set(before)
    t = time.monotonic()
    rater = HiddenRater(correction_rate=args.correction_rate, seed=args.seed * 1000 + k)
    asked = questions(args.seed * 1000 + k, args.per_round, heldout=False, templates=BENCH_TEMPLATES)
    row["traffic"] = client.play_users(asked, rater)
    row["traffic"]["up_rate"] = row["traffic"]["up"] / max(1, row["traffic"]["chats"])
    row["seconds"] = {"traffic": time.monotonic() - t}
    log(f"round {k}: {row['traffic']['chats']} chats, {row['traffic']['up']} up, "
        f"{row['traffic']['corrections']} corrections ({row['seconds']['traffic']:.0f}s)")

    run = client.wait_new_run(known, timeout=60, alive=alive)
    row["run_id"] = run["id"]
    clock = PhaseClock()
    last_step = [0]

    def on_poll(r: dict) -> None:
        clock(r)
        p = r.get("progress") or {}
        if r["state"] == "training" and p.get("step") and p["step"] - last_step[0] >= 25:
            last_step[0] = p["step"]
            log(f"round {k}: training step {p['step']}/{p.get('total_steps')} loss {p.get('loss'):.3f}")

    run = client.wait_state(run["id"], {"live", "canary", "rejected", "failed", "awaiting_approval"},
                            timeout=args.round_timeout, on_poll=on_poll, alive=alive)
    if run["state"] == "awaiting_approval":  # a --policy with approval: manual: approve as ops
        client.approve(run["id"], "sim_product: gate passed")
        run = client.wait_state(run["id"], {"live", "canary", "failed"}, timeout=args.round_timeout,
                                on_poll=on_poll, alive=alive)
    clock({"state": "_done"})
    detail = client.run(run["id"])
    row["seconds"].update({k2: round(v, 2) for k2, v in clock.seconds.items()})
    gate = detail["metrics"].get("gate") or {}
    verdict = detail.get("verdict") or {}
    training = detail["metrics"].get("training") or {}
    row.update({
        "state": detail["state"], "candidate": detail["candidate_version"],
        "parent": detail["parent_version"] or "base", "method": detail["method"],
        "dataset": {key: detail["dataset_stats"].get(key) for key in
                    ("train_items", "heldout_items", "replay", "ups", "downs", "corrections",
                     "sft_train", "dropped_duplicates", "dropped_rater_cap")},
        "training": {key: training.get(key) for key in ("steps", "train_loss", "final_loss", "seconds")},
        "gate": {"passed": verdict.get("passed"), "reasons": verdict.get("reasons", []),
                 "notes": verdict.get("notes", []),
                 "metrics": {key: gate.get(key) for key in
                             ("reference", "preference_accuracy", "n_preference", "reward_margin",
                              "nll_reference", "nll_candidate", "nll_base", "n_nll")},
                 "golden": [{"prompt": g["prompt"], "passed": g["passed"], "output": g.get("output")}
                            for g in (detail["metrics"].get("golden") or [])]},
        "deploy_timings": (detail["metrics"].get("deploy") or {}).get("timings"),
        "failure_reason": detail.get("failure_reason"),
    })
    promoted = detail["state"] in ("live", "canary")
    row["promoted"] = promoted
    if promoted:
        client.wait_serving(detail["candidate_version"])
    if scorer is not None and detail.get("lineage", {}).get("artifact_path"):
        t = time.monotonic()
        row["candidate_rate_offline"] = scorer.rate(detail["lineage"]["artifact_path"], held)
        row["seconds"]["offline_score"] = round(time.monotonic() - t, 2)
    # The watch window judges the previous version on this round's traffic: did it roll back?
    rolled = [r for r in client.runs() if before.get(r["id"]) in ("live", "canary")
              and r["state"] == "rolled_back"]
    if rolled:
        row["rolled_back"] = [{"version": r["candidate_version"], "watch": r["verdict"].get("watch")}
                              for r in rolled]
        log(f"round {k}: the watch window rolled back {[r['candidate_version'] for r in rolled]}")
    m = client.measure(held)
    row["heldout"] = m.as_dict()
    row["serving"] = max(m.served, key=m.served.get) if m.served else None
    row["seconds"]["measure"] = round(m.seconds, 2)
    # The loop's own time: the benchmark's offline scoring is not part of it.
    row["seconds"]["round"] = round(time.monotonic() - t_round - row["seconds"].get("offline_score", 0), 2)
    row["seconds"]["traffic"] = round(row["seconds"]["traffic"], 2)
    log(f"round {k}: {detail['candidate_version']} {detail['state']}; serving {row['serving']}; "
        f"held-out {m.ups}/{m.n} ({row['seconds']['round']:.0f}s)")
    return row


def verdict_text(row: dict) -> str:
    g = row.get("gate") or {}
    if row.get("state") == "failed":
        return "failed"
    if g.get("passed"):
        gm = g.get("metrics") or {}
        acc = gm.get("preference_accuracy")
        bits = [f"pref acc {acc:.2f}" if isinstance(acc, float) else "pref acc n/a"]
        if isinstance(gm.get("nll_reference"), float) and isinstance(gm.get("nll_candidate"), float):
            bits.append(f"NLL {gm['nll_reference']:.3f}→{gm['nll_candidate']:.3f}")
        golden = g.get("golden") or []
        bits.append(f"golden {sum(x['passed'] for x in golden)}/{len(golden)}")
        return "passed (" + ", ".join(bits) + ")"
    return "rejected: " + "; ".join(g.get("reasons") or ["?"])


def table(rows: list[dict]) -> str:
    lines = ["| round | serving | held-out thumbs-up | candidate (offline) | gate verdict | "
             "users' thumbs-up (traffic) | train examples | train s | gate s | swap s | round s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h = r["heldout"]
        if r["round"] == 0:
            lines.append(f"| 0 | {r['serving']} | {h['thumbs_up_rate']:.0%} ({h['ups']}/{h['n']}) | – | – "
                         f"| – | – | – | – | – | {r['seconds']['round']:.0f} |")
            continue
        s = r["seconds"]
        cand = r.get("candidate_rate_offline")
        ds = r.get("dataset") or {}
        serving = r["serving"] + "".join(f" ({x['version']} rolled back by the watch)"
                                         for x in r.get("rolled_back", []))
        lines.append(
            f"| {r['round']} | {serving} | {h['thumbs_up_rate']:.0%} ({h['ups']}/{h['n']}) | "
            f"{r.get('candidate') or '–'}: {f'{cand:.0%}' if cand is not None else '–'} | "
            f"{verdict_text(r)} | {r['traffic']['up_rate']:.0%} of {r['traffic']['chats']} | "
            f"{ds.get('sft_train', '–')} ({ds.get('replay', 0)} replay) | "
            f"{s.get('train', 0) + s.get('queue', 0):.0f} | {s.get('gate', 0):.0f} | "
            f"{s.get('swap', 0):.0f} | {s['round']:.0f} |")
    return "\n".join(lines)


def check_promotions(rows: list[dict]) -> dict:
    """Every promoted version's served held-out rate >= the rate served before it."""
    violations, rejected = [], []
    prev = rows[0]["heldout"]["thumbs_up_rate"]
    for r in rows[1:]:
        rate = r["heldout"]["thumbs_up_rate"]
        if r.get("promoted") and rate < prev:
            violations.append({"round": r["round"], "version": r["candidate"], "rate": rate,
                               "previous_rate": prev})
        if not r.get("promoted"):
            cand = r.get("candidate_rate_offline")
            rejected.append({"round": r["round"], "version": r.get("candidate"),
                             "candidate_rate_offline": cand, "serving_rate": rate,
                             "worse_than_serving": None if cand is None else cand < rate})
        prev = rate
    return {"no_bad_candidate_promoted": not violations, "violations": violations,
            "not_promoted": rejected}


def run_offline(args, policy_text: str, held) -> list[dict]:
    """The same rounds without servers, for tuning a policy in minutes.

    Same product, rater, policy and code path for the data and the model (workers.dataset
    build_dataset with the policy's dataset rules and replay, workers.training.train_adapter with
    the policy's hyper-parameters as workers.steps maps them, starting from the serving version,
    workers.evaluation.offline_metrics + workers.gate.decide, the golden suite generated with
    transformers), but answers come from transformers greedy decoding instead of vLLM, and a
    passing candidate is promoted directly (no swap, no watch window).
    """
    import uuid
    from datetime import timedelta

    import yaml
    from transformers import AutoTokenizer

    from service.policy import Policy
    from workers.dataset import DatasetPolicy, RatedInteraction, build_dataset
    from workers.evaluation import offline_metrics
    from workers.gate import check_golden_output, decide
    from workers.redaction import get_redactor
    from workers.steps import _training_config
    from workers.training import train_adapter

    policy = Policy.model_validate(yaml.safe_load(policy_text))
    model_dir = build_model(args)
    root = Path(tempfile.mkdtemp(prefix="fwsim-offline-"))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    scorer = OfflineScorer(model_dir, max_tokens=24)
    ids = random.Random(args.seed)
    serving: str | None = None
    pool: list = []
    t0 = datetime.now(UTC)
    rows = []
    t = time.monotonic()
    rate, _ = scorer.answers(serving, held)
    rows.append({"round": 0, "serving": "base", "heldout": {"thumbs_up_rate": rate, "ups": round(rate * len(held)),
                 "n": len(held)}, "seconds": {"round": round(time.monotonic() - t, 2)}})
    log(f"offline round 0 (base): held-out {rate:.0%}")
    try:
        for k in range(1, args.rounds + 1):
            t_round = time.monotonic()
            rater = HiddenRater(correction_rate=args.correction_rate, seed=args.seed * 1000 + k)
            asked = questions(args.seed * 1000 + k, args.per_round, heldout=False,
                              templates=BENCH_TEMPLATES)
            _, answers = scorer.answers(serving, asked)
            new, ups = [], 0
            for n, (q, answer) in enumerate(zip(asked, answers, strict=True)):
                body = rater(q, answer)
                ups += body["rating"] == "up"
                new.append(RatedInteraction(
                    interaction_id=str(uuid.UUID(int=ids.getrandbits(128))),
                    messages=[{"role": "user", "content": q.text}], response_text=answer,
                    rating=body["rating"], correction=body.get("correction"), rater_id=f"user{n % 7}",
                    created_at=t0 + timedelta(seconds=1000 * k + n), version=serving))
            d = policy.dataset
            built = build_dataset(new, pool, tokenizer=tokenizer, redactor=get_redactor(d.redactor),
                                  policy=DatasetPolicy(
                                      method=policy.training.method, heldout_fraction=d.heldout_fraction,
                                      replay_fraction=d.replay_fraction, max_chars=d.max_chars,
                                      max_rater_share=d.max_rater_share, min_examples=d.min_examples,
                                      max_tokens=policy.training.max_length, seed=policy.training.seed))
            pool = [x for x in new if x.rating == "up" or x.correction] + pool
            t = time.monotonic()
            out_dir = root / f"v{k}"
            result = train_adapter(
                base_model_dir=str(model_dir),
                data={"train": built.train[built.method], "eval": built.heldout.get(built.method, [])},
                config=_training_config(policy, built.method, built), out_dir=out_dir,
                work_dir=root / f"work{k}",
                parent_adapter_dir=serving if policy.training.start_from == "serving" else None)
            train_s = time.monotonic() - t
            t = time.monotonic()
            metrics = offline_metrics(str(model_dir), str(out_dir), serving, built.heldout_raw)
            golden = []
            for case in policy.gate.golden:
                output = scorer.generate(str(out_dir), case.prompt, case.max_tokens)
                failures = check_golden_output(case, output)
                golden.append({"prompt": case.prompt, "output": output, "passed": not failures,
                               "failures": failures})
            verdict = decide(policy.gate, metrics, golden or None)
            gate_s = time.monotonic() - t
            cand_rate, _ = scorer.answers(str(out_dir), held)
            if verdict.passed:
                serving = str(out_dir)
            served_rate = cand_rate if verdict.passed else rows[-1]["heldout"]["thumbs_up_rate"]
            row = {"round": k, "serving": Path(serving).name if serving else "base",
                   "candidate": f"v{k}", "state": "live" if verdict.passed else "rejected",
                   "promoted": verdict.passed, "method": built.method,
                   "traffic": {"chats": len(new), "up": ups, "up_rate": ups / len(new)},
                   "dataset": {key: built.stats.get(key) for key in ("sft_train", "replay", "heldout_items")},
                   "training": {key: result.metrics.get(key) for key in ("steps", "final_loss")},
                   "gate": {"passed": verdict.passed, "reasons": verdict.reasons, "metrics": metrics,
                            "golden": golden},
                   "candidate_rate_offline": cand_rate,
                   "heldout": {"thumbs_up_rate": served_rate, "ups": round(served_rate * len(held)),
                               "n": len(held)},
                   "seconds": {"train": round(train_s, 2), "gate": round(gate_s, 2),
                               "round": round(time.monotonic() - t_round, 2)}}
            rows.append(row)
            log(f"offline round {k}: {built.method} on {built.stats.get(built.method + '_train')} examples, "
                f"final loss {result.metrics.get('final_loss'):.3f}; candidate {cand_rate:.0%}; "
                f"{verdict_text(row)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def build_model(args) -> Path:
    from service.tiny_model import build_tiny_model

    return build_tiny_model(MODEL_CACHE / f"tiny-model-sim-{args.pretrain_steps}",
                            pretrain_steps=args.pretrain_steps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sim_product", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="retraining rounds after round 0")
    ap.add_argument("--per-round", type=int, default=48,
                    help="rated chats per round (also the policy's trigger threshold)")
    ap.add_argument("--correction-rate", type=float, default=0.5,
                    help="share of thumbs-down that come with the wanted answer")
    ap.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS,
                    help="base model pretraining on the synthetic corpus")
    ap.add_argument("--seed", type=int, default=0, help="users' questions and rater draws")
    ap.add_argument("--policy", type=Path, help="a policy YAML instead of the tuned one "
                    "(its trigger should fire at --per-round ratings)")
    ap.add_argument("--offline", action="store_true",
                    help="tune quickly: the same rounds without servers (see run_offline)")
    ap.add_argument("--no-offline-score", action="store_true",
                    help="skip scoring each candidate offline with transformers")
    ap.add_argument("--round-timeout", type=float, default=1200, help="seconds a run may take")
    ap.add_argument("--data-dir", type=Path,
                    help="where the stack's servers, logs and artifacts live (default: a fresh temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the data dir (logs, artifacts)")
    ap.add_argument("--out", type=Path, help="JSON result path (default bench/results/...)")
    args = ap.parse_args(argv)

    started = datetime.now(UTC)
    policy = args.policy.read_text() if args.policy else policy_yaml(args.per_round)
    held = heldout_questions(BENCH_TEMPLATES)
    if args.offline:
        rows = run_offline(args, policy, held)
        print(table(rows))
        print(f"\noffline (transformers, no servers): rise "
              f"{100 * (rows[-1]['heldout']['thumbs_up_rate'] - rows[0]['heldout']['thumbs_up_rate']):+.0f} "
              f"points; {check_promotions(rows)}")
        return 0
    if args.data_dir is not None:
        if args.data_dir.exists() and any(args.data_dir.iterdir()):
            ap.error(f"--data-dir {args.data_dir} is not empty: the benchmark starts from nothing")
        args.data_dir.mkdir(parents=True, exist_ok=True)
    root = args.data_dir.resolve() if args.data_dir else Path(tempfile.mkdtemp(prefix="fwsim-"))
    t0 = time.monotonic()
    log(f"data dir {root}; building/reusing the tiny model ({args.pretrain_steps} pretraining steps)")
    sim = SimulatedStack.prepare(root, Settings(), policy_yaml=policy, embedded=True,
                                 pretrain_steps=args.pretrain_steps,
                                 model_dir=MODEL_CACHE / f"tiny-model-sim-{args.pretrain_steps}")
    model_s = time.monotonic() - t0
    rows: list[dict] = []
    ok = False
    try:
        t = time.monotonic()
        sim.start(on_step=lambda m: log(m))
        stack_s = time.monotonic() - t
        scorer = None if args.no_offline_score else OfflineScorer(sim.model_dir, max_tokens=24)
        with httpx.Client(base_url=sim.api_url, timeout=120) as api:
            client = ProductClient(api, sim.product_key, sim.ops_key)
            m = client.measure(held)
            rows.append({"round": 0, "serving": max(m.served, key=m.served.get), "heldout": m.as_dict(),
                         "seconds": {"round": round(m.seconds, 2), "measure": round(m.seconds, 2)}})
            log(f"round 0 (base): held-out {m.ups}/{m.n}; e.g. {m.examples[0]}")
            for k in range(1, args.rounds + 1):
                rows.append(play_round(k, client, sim, args, held, scorer))
        ok = True
    finally:
        sim.stop()
        if ok and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            log(f"kept {root} (logs in {root / 'logs'})")

    promotions = check_promotions(rows)
    base_rate, last_rate = rows[0]["heldout"]["thumbs_up_rate"], rows[-1]["heldout"]["thumbs_up_rate"]
    summary = {"rise_points": round(100 * (last_rate - base_rate), 1), "base_rate": base_rate,
               "final_rate": last_rate, **promotions, "model_s": round(model_s, 1),
               "stack_s": round(stack_s, 1), "total_s": round(time.monotonic() - t0, 1)}
    md = table(rows)
    print(md)
    print(f"\nheld-out: {len(held)} questions ({len({(q.product, q.issue) for q in held})} unseen "
          f"combinations x {len(BENCH_TEMPLATES)} phrasings); rise {summary['rise_points']:+.0f} "
          f"points after {args.rounds} rounds; no bad candidate promoted: "
          f"{promotions['no_bad_candidate_promoted']}")
    RESULTS_DIR.mkdir(exist_ok=True)
    out = args.out or RESULTS_DIR / f"sim_product-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python -m bench.sim_product " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started_at": started.isoformat(), "params": {k: str(v) for k, v in vars(args).items()},
        "policy": policy, "templates": list(BENCH_TEMPLATES),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "summary": summary, "rounds": rows, "table": md}, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
