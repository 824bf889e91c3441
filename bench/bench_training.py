"""Training throughput of workers.training.train_adapter (SFT) beside a plain transformers Trainer.

    /root/.cache/flywheel/venv/bin/python -m bench.bench_training        # < 1 min on 2 idle cores
    /root/.cache/flywheel/venv/bin/python -m bench.bench_training --steps 60 --repeats 5
    /root/.cache/flywheel/venv/bin/python -m bench.bench_training --model smollm2 --variants 0 1 \
        --steps 10 --repeats 2 --isolate      # the real default model; peak RSS per variant

Every variant trains the same LoRA (r=8, q_proj/v_proj) on the same tiny model and the same
records, for the same number of optimizer steps at the same per-device batch size, in fp32, with
no checkpoints inside the timed window, in this one process. The baseline is what one would write
by hand: tokenize prompt+completion, mask the prompt, pad per batch (DataCollatorForSeq2Seq),
`Trainer` + `get_peft_model`. Throughput is non-padding input tokens per second of `train()`
(model loading, tokenization and artifact writing excluded; they are reported as wall time),
per wall second and per CPU second of this process. Runs are interleaved and repeated, and the
median is kept; on a shared machine the CPU-second figures are the steadier ones. With
--isolate every run is a fresh process, and its peak resident memory (ru_maxrss: imports, model,
optimizer, activations) is reported per variant.

Prints a markdown table and writes bench/results/training-<utc time>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.domain.policy import Policy
from service.local.tiny_model import build_tiny_model, synthetic_dialogues
from workers.recipe import training_config
from workers.training import library_versions, train_adapter

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL_DIR = Path.home() / ".cache" / "flywheel" / "tiny-model-v1"
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
LEARNING_RATE = 2e-4


def make_records(tokenizer, n: int, seed: int = 7) -> list[dict[str, str]]:
    """SFT records of varied length, rendered as workers.dataset renders them."""
    records = []
    for q, a in synthetic_dialogues(n, seed=seed):
        messages = [{"role": "user", "content": q}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": a}], tokenize=False)
        records.append({"prompt": prompt, "completion": full[len(prompt):].rstrip()})
    return records


def _cpu_timer():
    """A TrainerCallback timing train() in CPU seconds of this process (steadier when shared)."""
    from transformers import TrainerCallback

    class CpuTimer(TrainerCallback):
        cpu_s = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.process_time()

        def on_train_end(self, args, state, control, **kwargs):
            self.cpu_s = time.process_time() - self.t0

    return CpuTimer()


def run_baseline(model_dir: Path, records: list[dict], *, steps: int, batch_size: int,
                 work: Path) -> dict[str, Any]:
    """Plain transformers Trainer + PEFT on the same records."""
    import huggingface_hub.constants as hub_constants
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    hub_constants.HF_HUB_DISABLE_TELEMETRY = True
    t_wall = time.monotonic()
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for rec in records:
        n_prompt = len(tok(rec["prompt"], add_special_tokens=False)["input_ids"])
        ids = tok(rec["prompt"] + rec["completion"], add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                     "labels": [-100] * n_prompt + ids[n_prompt:]})
    set_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(**LORA, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(work), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=LEARNING_RATE, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="linear",
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        seed=0, data_seed=0, include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
    )
    timer = _cpu_timer()
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
                      callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    t0 = time.monotonic()
    out = trainer.train()
    seconds = time.monotonic() - t0
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "cpu_s": timer.cpu_s,
            "steps": trainer.state.global_step, "train_loss": out.training_loss,
            "wall_s": time.monotonic() - t_wall}


def run_train_adapter(model_dir: Path, records: list[dict], *, steps: int, batch_size: int,
                      work: Path, **batching: Any) -> dict[str, Any]:
    """workers.training.train_adapter with the same LoRA, steps and batch size."""
    t_wall = time.monotonic()
    # The product's mapping from a policy (workers.recipe), then what a policy does not set.
    policy = Policy.model_validate({"training": {
        "lora": {"r": LORA["r"], "alpha": LORA["lora_alpha"], "target_modules": LORA["target_modules"]},
        "learning_rate": LEARNING_RATE, "max_steps": steps, "batch_size": batch_size,
        "checkpoint_every_steps": steps + 1}})
    config = dataclasses.replace(
        training_config(policy, "sft", max_length=batching.pop("max_length", None)),
        precision="fp32", **batching)
    timer = _cpu_timer()
    result = train_adapter(base_model_dir=model_dir, data={"train": records}, config=config,
                           out_dir=work / "artifact", work_dir=work / "work", callbacks=[timer])
    m = result.metrics
    return {"tokens": m["tokens"], "seconds": m["seconds"], "tokens_per_s": m["tokens_per_s"],
            "cpu_s": timer.cpu_s, "steps": m["steps"], "train_loss": m["train_loss"],
            "wall_s": time.monotonic() - t_wall}


VARIANTS = {
    "baseline: Trainer + PEFT (padded)": lambda md, recs, **kw: run_baseline(md, recs, **kw),
    "train_adapter (padded)": lambda md, recs, **kw: run_train_adapter(md, recs, **kw),
    "train_adapter (padding_free)": lambda md, recs, **kw: run_train_adapter(md, recs, padding_free=True, **kw),
    "train_adapter (padded, TRL fused loss)": lambda md, recs, **kw: run_train_adapter(
        md, recs, fused_loss=True, **kw),
    # Rows of 64 tokens hold ~2.5 of these examples: more tokens per step than the others.
    "train_adapter (packing, 64-token rows)": lambda md, recs, **kw: run_train_adapter(
        md, recs, packing=True, max_length=64, **kw),
}
BASELINE = next(iter(VARIANTS))


def _run_isolated(name: str, model_dir: Path, records: list[dict], kw: dict) -> dict[str, Any]:
    """One variant in this (fresh) process, with the process's peak resident memory."""
    import resource

    out = VARIANTS[name](model_dir, records, **kw)
    return {**out, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench(model_dir: Path, *, steps: int, batch_size: int, examples: int, repeats: int,
          variants: list[str] | None = None, isolate: bool = False) -> dict[str, Any]:
    """Run every variant `repeats` times, interleaved; return per-variant medians and raw runs."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from transformers import AutoTokenizer

    names = variants or list(VARIANTS)
    records = make_records(AutoTokenizer.from_pretrained(model_dir), examples)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        for r in range(repeats):
            for i, name in enumerate(names):
                kw = {"steps": steps, "batch_size": batch_size, "work": Path(tmp) / f"{r}-{i}"}
                if not isolate:
                    runs[name].append(VARIANTS[name](model_dir, records, **kw))
                    continue
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    runs[name].append(pool.submit(_run_isolated, name, model_dir, records, kw).result())
    def med(xs: list[dict], f) -> float:
        return statistics.median(f(x) for x in xs)

    base = BASELINE if BASELINE in runs else names[0]
    base_tps = med(runs[base], lambda x: x["tokens_per_s"])
    base_cpu = med(runs[base], lambda x: x["tokens"] / x["cpu_s"])
    summary = {}
    for name, xs in runs.items():
        tps, cpu_tps = med(xs, lambda x: x["tokens_per_s"]), med(xs, lambda x: x["tokens"] / x["cpu_s"])
        summary[name] = {
            "tokens_per_s": tps,
            "tokens_per_cpu_s": cpu_tps,
            "steps_per_s": med(xs, lambda x: x["steps"] / x["seconds"]),
            "tokens_per_step": med(xs, lambda x: x["tokens"] / x["steps"]),
            "wall_s": med(xs, lambda x: x["wall_s"]),
            "ratio_vs_baseline": tps / base_tps,
            "cpu_ratio_vs_baseline": cpu_tps / base_cpu,
            **({"peak_rss_mb": med(xs, lambda x: x["peak_rss_mb"])} if isolate else {}),
        }
    return {"summary": summary, "runs": runs}


def markdown(summary: dict[str, dict]) -> str:
    lines = ["| variant | tokens/s | tokens/CPU-s | steps/s | tokens/step | wall s | ratio | CPU ratio | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary.items():
        rss = f"{s['peak_rss_mb']:.0f}" if "peak_rss_mb" in s else "-"
        lines.append(f"| {name} | {s['tokens_per_s']:.0f} | {s['tokens_per_cpu_s']:.0f} | {s['steps_per_s']:.2f} "
                     f"| {s['tokens_per_step']:.0f} | {s['wall_s']:.1f} | {s['ratio_vs_baseline']:.2f} "
                     f"| {s['cpu_ratio_vs_baseline']:.2f} | {rss} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                        help="tiny model dir (built if missing)")
    parser.add_argument("--model", default="tiny",
                        help="tiny (built in --model-dir), smollm2 (the default, from pip) or a dir")
    parser.add_argument("--variants", type=int, nargs="+",
                        help=f"indexes into: {', '.join(f'{i}={n}' for i, n in enumerate(VARIANTS))}")
    parser.add_argument("--isolate", action="store_true",
                        help="each run in a fresh process, with its peak RSS")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    ns = parser.parse_args()
    if ns.model == "tiny":
        model_dir = build_tiny_model(ns.model_dir)
    else:
        from bench._stack import bench_model

        model_dir = bench_model(ns.model)
    started = datetime.now(UTC)
    names = [list(VARIANTS)[i] for i in ns.variants] if ns.variants else None
    out = bench(model_dir, steps=ns.steps, batch_size=ns.batch_size, examples=ns.examples,
                repeats=ns.repeats, variants=names, isolate=ns.isolate)
    table = markdown(out["summary"])
    print(f"\nSFT training throughput: {ns.steps} steps x batch {ns.batch_size}, {ns.examples} records, "
          f"{ns.model} model, fp32, median of {ns.repeats}\n")
    print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"training-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    payload = {
        "started_at": started.isoformat(), "params": {k: str(v) for k, v in vars(ns).items()},
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "library_versions": library_versions(), **out,
    }
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
