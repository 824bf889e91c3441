"""What running each training as an `accelerate launch` job costs, against training in the
worker's own process as Flywheel did before (workers/trainer/).

    /root/.cache/flywheel/venv/bin/python -m bench.bench_trainer_job             # ~2 min, 2 idle cores
    /root/.cache/flywheel/venv/bin/python -m bench.bench_trainer_job --steps 40 --repeats 5

The same spec (tiny model, 16 addition records, LoRA, fp32, --steps optimizer steps of batch 2)
trains three ways, interleaved, each --repeats times:

- in-process: `train_adapter` called in this process after torch, transformers and TRL are
  imported (a warm worker's old path); the baseline;
- job, 1 process: LocalAccelerateBackend.submit + drive to the result (supervisor, `accelerate
  launch`, a fresh Python importing torch and TRL, the training, the result file);
- job, 2 processes: the same with FLYWHEEL_TRAIN_PROCESSES=2 (DDP, gloo).

Wall seconds from the call to the artifact on disk; the median is kept. The job's overhead is
its median minus the baseline's. Prints a markdown table and writes
bench/results/trainer-job-<utc time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from service.config import Settings
from service.local.tiny_model import build_tiny_model
from tests.helpers.datasets import addition_records
from workers.trainer.backend import TrainJob
from workers.trainer.drive import drive
from workers.trainer.local import LocalAccelerateBackend
from workers.training import TrainingConfig, read_jsonl, train_adapter

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TINY_MODEL_DIR = Path.home() / ".cache" / "flywheel" / "tiny-model-v1"


def _spec(root: Path, model: Path, steps: int) -> dict:
    return {"base_model_dir": str(model), "data": {"train": str(root.parent / "train.jsonl")},
            "config": {"method": "sft", "learning_rate": 1e-3, "per_device_batch_size": 2,
                       "max_steps": steps, "checkpoint_every_steps": steps, "precision": "fp32"},
            "out_dir": str(root / "adapter"), "work_dir": str(root / "work"), "lineage": {}}


def _in_process(root: Path, spec: dict) -> float:
    t0 = time.perf_counter()
    train_adapter(base_model_dir=spec["base_model_dir"], data={"train": read_jsonl(spec["data"]["train"])},
                  config=TrainingConfig.from_dict(spec["config"]), out_dir=spec["out_dir"],
                  work_dir=spec["work_dir"])
    return time.perf_counter() - t0


def _as_job(root: Path, spec: dict, processes: int | None) -> float:
    backend = LocalAccelerateBackend(Settings(train_processes=processes, train_poll_interval_s=0.1))
    t0 = time.perf_counter()
    result = drive(backend, ref=None, new_job=lambda n: TrainJob(root / f"job-{n}", spec, n),
                   store_ref=lambda ref: None, report=lambda event: None, max_restarts=0,
                   interval_s=0.1)
    seconds = time.perf_counter() - t0
    assert Path(result["artifact_dir"]).is_dir()
    return seconds


def main() -> None:
    """Run the benchmark (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers import AutoTokenizer  # noqa: PLC0415 - heavy; after argparse answers --help

    model = build_tiny_model(TINY_MODEL_DIR)
    variants = {"in-process (baseline)": lambda r, s: _in_process(r, s),
                "job, 1 process": lambda r, s: _as_job(r, s, None),
                "job, 2 processes (DDP)": lambda r, s: _as_job(r, s, 2)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="bench-trainer-job-") as tmp:
        base = Path(tmp)
        (base / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                                  addition_records(AutoTokenizer.from_pretrained(model))))
        _in_process(base / "warm", _spec(base / "warm", model, 2))  # imports, as in a warm worker
        for i in range(args.repeats):
            for j, (name, run) in enumerate(variants.items()):
                root = base / f"r{i}-{j}"
                times[name].append(run(root, _spec(root, model, args.steps)))
                print(f"{name} #{i + 1}: {times[name][-1]:.1f} s", flush=True)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    baseline = median["in-process (baseline)"]
    print(f"\n{args.steps} steps, {args.repeats} repeats, load {os.getloadavg()[0]:.1f}\n")
    print("| way | median wall s | overhead vs in-process s |\n|---|---:|---:|")
    for name, m in median.items():
        print(f"| {name} | {m:.1f} | {m - baseline:+.1f} |")
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"trainer-job-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    out.write_text(json.dumps({"steps": args.steps, "repeats": args.repeats, "seconds": times,
                               "median": median, "load_after": os.getloadavg()}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
