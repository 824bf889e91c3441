"""Does the loop make a model better from its users' thumbs, and never worse? An honest benchmark.

    python -m bench.learning --task support_desk --task json_reply           # SmolLM2, 3 seeds x 3 rounds
    python -m bench.learning --task json_reply --model tiny --seeds 1 --rounds 2 --arms clean poisoned
    python -m bench.learning --task my_task.py --split dev                   # tune on dev, never on test

What runs: the real stack on a fresh directory (embedded Postgres + Redis, a managed vLLM, the API,
a Celery worker and beat), serving SmolLM2-135M-Instruct (the default; `--model tiny` for the
1M-parameter test model, or a model directory). A task (service/tasks/: NAME, prompts(split, n,
rng), rate(messages, answer, rng), optional WANTED) plays the product through the public API:
its users chat with an alias and post thumbs and corrections; the trigger starts a run; the worker
builds the dataset, trains, gates and (policy `approval: auto`: the gate is the only judge)
hot-swaps. The worker never imports the task.

Per task and seed, on the same prompts of the chosen split (test by default: never tuned on):
- `base`: the base model (an alias that never trains);
- `icl`: the base model with k corrected answers from the arm's own feedback so far placed before
  the question as examples (in-context learning);
- the serving version after each round (each promotion, and what the watch window rolled back);
- `oracle`: an adapter trained once from the base, same recipe, on the wanted answers to every
  train prompt the arm's users will ask (the ceiling; no gate).
Arms: `clean` (honest raters) and `poisoned` (a share of raters voting at random and a share
inverting their votes). A candidate worse on test than what served is a bad candidate; the JSON
says what stopped each (the gate, the watch window) and counts bad promotions.

Writes --out (default bench/results/learning-<utc>.json): per task, seed, arm and round the rates
and n, gate verdicts and reasons, timings by stage; and the summary (means and 95% t-intervals
over seeds) with the issue's targets met or missed. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.learning import policies
from bench.learning.play import Config, SeedRun
from bench.learning.stats import summarize
from service.config import Settings
from service.local.simulation import SimulatedStack
from service.tasks import TaskError, load_task

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"
MODEL_CACHE = Path.home() / ".cache" / "flywheel"
TINY_PRETRAIN_STEPS = 400
PER_ROUND = {"tiny": 32, "smollm2": 40}
STAGES = ("traffic", "queue", "dataset", "train", "gate", "swap", "measure", "icl", "round")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.learning", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", action="append", required=True,
                    help="a task module name (support_desk, json_reply) or a .py file; repeatable")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3, help="how many seeds")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run from this one up")
    ap.add_argument("--model", default="smollm2", help="smollm2 (default), tiny, or a model directory")
    ap.add_argument("--arms", nargs="+", choices=["clean", "poisoned"], default=["clean"])
    ap.add_argument("--random-raters", type=float, default=0.25,
                    help="poisoned arm: share of raters voting at random")
    ap.add_argument("--inverted-raters", type=float, default=0.25,
                    help="poisoned arm: share of raters inverting their votes")
    ap.add_argument("--per-round", type=int, help="rated chats per round (and the trigger); "
                    f"default {PER_ROUND['smollm2']} on SmolLM2, {PER_ROUND['tiny']} on tiny")
    ap.add_argument("--test-n", type=int, default=24, help="scored prompts per seed")
    ap.add_argument("--icl-k", type=int, default=4, help="examples in the in-context baseline")
    ap.add_argument("--split", choices=["test", "dev"], default="test",
                    help="what is scored: dev while tuning anything, test for the record")
    ap.add_argument("--no-oracle", action="store_true", help="skip the oracle adapter")
    ap.add_argument("--policy", type=Path, help="a policy YAML instead of the model's default "
                    "(its trigger should fire at --per-round ratings)")
    ap.add_argument("--round-timeout", type=float, default=1800, help="seconds a run may take")
    ap.add_argument("--data-dir", type=Path, help="where the servers, logs and artifacts live "
                    "(default: a fresh temp dir, removed after a successful run)")
    ap.add_argument("--keep", action="store_true", help="keep the data dir")
    ap.add_argument("--out", type=Path, help="JSON result path")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.seeds < 1 or args.test_n < 1 or args.icl_k < 0 or args.first_seed < 0:
        ap.error("--rounds, --seeds and --test-n must be at least 1, --icl-k and --first-seed "
                 "at least 0")
    if not (0 <= args.random_raters and 0 <= args.inverted_raters
            and args.random_raters + args.inverted_raters <= 1):
        ap.error("--random-raters and --inverted-raters must be shares summing to at most 1")
    try:
        args.tasks = [load_task(spec) for spec in args.task]
    except TaskError as exc:
        ap.error(str(exc))
    if args.data_dir is not None and args.data_dir.exists() and any(args.data_dir.iterdir()):
        ap.error(f"--data-dir {args.data_dir} is not empty: the benchmark starts from nothing")
    args.per_round = args.per_round or PER_ROUND["tiny" if args.model == "tiny" else "smollm2"]
    return args


def prepare_stack(args, root: Path, policy: str) -> SimulatedStack:
    # Every alias that gets versions (one per arm, one oracle, per task and seed) is served at
    # once and holds up to 3 LoRAs in the engine (live, warm previous, staged).
    trained = len(args.tasks) * args.seeds * (len(args.arms) + (not args.no_oracle))
    base = Settings()
    base = base.model_copy(update={
        "vllm_max_loras": max(base.vllm_max_loras, trained),
        "vllm_max_cpu_loras": max(base.vllm_max_cpu_loras, 3 * trained)})
    if args.model == "tiny":
        return SimulatedStack.prepare(root, base, policy_yaml=policy, embedded=True,
                                      pretrain_steps=TINY_PRETRAIN_STEPS,
                                      model_dir=MODEL_CACHE / f"tiny-model-sim-{TINY_PRETRAIN_STEPS}")
    model = None if args.model == "smollm2" else str(Path(args.model).resolve())
    return SimulatedStack.prepare(root, base.model_copy(update={"base_model": model}),
                                  policy_yaml=policy, embedded=True, model_dir=None)


def pct(summary: dict | None) -> str:
    if not summary or summary.get("mean") is None:
        return "–"
    ci = summary.get("ci95")
    return f"{100 * summary['mean']:.0f}%" + (
        f" [{100 * max(0, ci[0]):.0f}, {100 * min(1, ci[1]):.0f}]" if ci else "")


def tables(runs: list[dict], summary: dict, rounds: int) -> str:
    head = ["task", "arm", "seeds", "base"] + [f"round {k}" for k in range(1, rounds + 1)] + \
           [f"icl (round {rounds})", "oracle", "gain (points)", "promoted", "bad promotions (beyond chance)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, arms in summary.items():
        for arm, s in arms.items():
            gain = s["gain_points"]
            gtext = f"{gain['mean']:+.0f}" + (f" [{gain['ci95'][0]:+.0f}, {gain['ci95'][1]:+.0f}]"
                                              if gain["ci95"] else "")
            lines.append("| " + " | ".join(
                [task, arm, str(len(s["seeds"])), pct(s["base"])]
                + [pct(x) for x in s["serving_by_round"]]
                + [pct(s["icl_by_round"][-1] if s["icl_by_round"] else None), pct(s["oracle"]), gtext,
                   str(s["promotions"]),
                   f"{s['bad_promotions']} ({s['significant_bad_promotions']})"]) + " |")
    stage_head = ["task", "arm", "seed", "round", "candidate", "verdict"] + list(STAGES)
    lines += ["", "| " + " | ".join(stage_head) + " |", "|" + "---|" * len(stage_head)]
    for r in runs:
        for row in r["rounds"]:
            verdict = row["state"] if not row["gate"]["reasons"] else \
                f"{row['state']}: {'; '.join(row['gate']['reasons'])}"
            lines.append("| " + " | ".join(
                [r["task"], r["arm"], str(r["seed"]), str(row["round"]), str(row["candidate"]), verdict]
                + [f"{row['seconds'].get(s, 0):.0f}" for s in STAGES]) + " |")
    return "\n".join(lines)


def write(out: Path, argv, started, args, policy: str, sim: SimulatedStack, runs: list[dict],
          t0: float, *, complete: bool) -> tuple[dict, str]:
    """The JSON record (rewritten after every seed, so a long run that is stopped keeps what
    it measured); returns the summary and the markdown tables."""
    summary = summarize(runs)
    md = tables(runs, summary, args.rounds)
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "tasks"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python -m bench.learning " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started_at": started.isoformat(), "complete": complete, "params": params,
        "model": str(sim.model_dir), "policy": policy,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "total_s": round(time.monotonic() - t0, 1),
        "summary": summary, "runs": runs, "table": md}, indent=2, default=str) + "\n")
    return summary, md


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = datetime.now(UTC)
    out = args.out or RESULTS_DIR / f"learning-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
    root = args.data_dir.resolve() if args.data_dir else Path(tempfile.mkdtemp(prefix="fwlearn-"))
    t0 = time.monotonic()
    policy = args.policy.read_text() if args.policy else policies.for_model(args.model, args.per_round)
    sim = prepare_stack(args, root, policy)
    runs: list[dict] = []
    ok = False
    try:
        sim.start(on_step=log)
        log(f"stack up in {time.monotonic() - t0:.0f}s; base model {sim.model_dir}")
        scorer = []

        def scorer_factory():
            if not scorer:
                from bench.learning.offline import OfflineScorer

                scorer.append(OfflineScorer(sim.model_dir))
            return scorer[0]

        with httpx.Client(base_url=sim.api_url, timeout=600) as api:
            for task in args.tasks:
                cfg = Config(task=task, rounds=args.rounds, per_round=args.per_round,
                             test_n=args.test_n, icl_k=args.icl_k, split=args.split,
                             random_share=args.random_raters, inverted_share=args.inverted_raters,
                             oracle=not args.no_oracle, policy=policy,
                             round_timeout=args.round_timeout, log=log)
                for seed in range(args.first_seed, args.first_seed + args.seeds):
                    runs += SeedRun(sim, api, cfg, seed, args.arms, scorer_factory).play()
                    write(out, argv, started, args, policy, sim, runs, t0, complete=False)
        ok = True
    finally:
        sim.stop()
        if ok and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            log(f"kept {root} (logs in {root / 'logs'})")

    summary, md = write(out, argv, started, args, policy, sim, runs, t0, complete=True)
    print(md)
    for task, arms in summary.items():
        for arm, s in arms.items():
            missed = [k for k, v in s["targets"].items() if not v]
            print(f"{task} / {arm}: targets " + ("all met" if not missed else "missed: " + ", ".join(missed)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
