"""Train a product's LoRA adapter with TRL (SFT, DPO or KTO) and write a vLLM-ready artifact.

`train_adapter` is the one entry point: it starts from the base model (or continues a parent
adapter), trains with TRL's trainer for the method, checkpoints into a work dir so a killed worker
resumes where it stopped, and writes an artifact directory (`adapter_model.safetensors` +
`adapter_config.json` + `lineage.json`, nothing pickled) atomically.

torch / transformers / trl / peft are imported inside functions only: the API process imports this
module for `TrainingConfig` and must not pay for (or need) torch.

The worker runs every training as `accelerate launch -m workers.training --spec spec.json`
(workers/trainer/: one process or many, DDP on CPU with gloo, several GPUs or machines):

    accelerate launch --config_file workers/accelerate/ddp_cpu.yaml -m workers.training --spec spec.json

The spec is JSON: {"base_model_dir", "data": {"train": jsonl, "eval": jsonl?}, "config": {...},
"out_dir", "work_dir", "parent_adapter_dir"?, "lineage"?, "result_path"?, "progress_path"?,
"error_dir"?}. Every process trains; only the main one writes the artifact, the result and the
progress (JSON lines); a process that raises records why in error_dir/error-<rank>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from service.domain.policy import TrainingPolicy
from service.engine.artifact import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ArtifactRejected,
    artifact_sha256,
    verify_artifact,
)
from service.files import atomic_write_text, publish_dir, staging_dir
from workers.config_dict import from_mapping
from workers.dataset import auto_special_prefix, engine_prompt, training_prompt
from workers.quantization import FALLBACKS, QUANTIZATIONS, QuantizationUnavailable, plan_quantization

__all__ = [
    "LINEAGE_FILE",
    "METHODS",
    "ProgressFn",
    "TrainResult",
    "TrainingConfig",
    "QuantizationUnavailable",
    "TrainingError",
    "latest_checkpoint",
    "main",
    "package_versions",
    "read_jsonl",
    "train_adapter",
]

log = logging.getLogger(__name__)

METHODS = ("sft", "dpo", "kto")
PRECISIONS = ("auto", "bf16", "fp32")
LINEAGE_FILE = "lineage.json"
LINEAGE_FORMAT = 1
CHECKPOINTS_DIR = "checkpoints"  # under work_dir: the Trainer's output_dir
EXPORT_DIR = "export"  # under work_dir: trainer.save_model() scratch (it also writes pickles)
RUN_FILE = "run.json"  # under work_dir: fingerprint of the run its checkpoints belong to
REQUIRED_KEYS = {
    "sft": ("prompt", "completion"),
    "dpo": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
}
# LoRA learning rates (TRL's own defaults, 2e-5 / 1e-6, are meant for full fine-tuning).
DEFAULT_LEARNING_RATE = {"sft": 2e-4, "dpo": 5e-5, "kto": 5e-5}
# Changing these between a crash and its retry still resumes the same run.
# (quantization_fallback only decides whether a run may train without QLoRA at all.)
_RESUMABLE_FIELDS = frozenset(
    {"epochs", "max_steps", "checkpoint_every_steps", "keep_checkpoints", "logging_steps",
     "quantization_fallback"}
)

ProgressFn = Callable[[dict[str, Any]], None]
# The shipped policy's training section: TrainingConfig's defaults are these, not numbers of its own.
_POLICY = TrainingPolicy()


class TrainingError(RuntimeError):
    """The inputs cannot be trained on (bad records, bad parent adapter, existing artifact...)."""


@dataclass
class TrainingConfig:
    """Hyper-parameters of one adapter training run (like TRL's *Config dataclasses, but small).

    An alias's policy (service.domain.policy.TrainingPolicy, the `training` section of policies/*.yaml)
    sets these through workers.recipe.training_config, and the defaults are the policy's. These
    differ from it:

    - method: "sft" instead of "auto" (the dataset build resolves "auto" before training).
    - learning_rate: None, the method's LoRA default, instead of 2e-4 for every method.
    - max_length: 1024 instead of unset (the mapping resolves unset to the engine's context).

    Parameters:
        method: "sft" (prompt/completion), "dpo" (prompt/chosen/rejected) or "kto"
            (prompt/completion/label).
        lora_r: LoRA rank. Must not exceed the engine's --max-lora-rank. Ignored when continuing
            a parent adapter (the parent's LoRA shape is kept).
        lora_alpha: LoRA scaling numerator (scale = alpha / r). Ignored with a parent.
        lora_dropout: dropout on the LoRA input. Ignored with a parent.
        target_modules: module names LoRA wraps. vLLM serves only LoRA on linear layers and
            refuses `modules_to_save`, so nothing else is trained. Ignored with a parent.
        learning_rate: peak AdamW learning rate; None picks a LoRA default per method
            (sft 2e-4, dpo/kto 5e-5).
        epochs: passes over the training records (fractions allowed).
        max_steps: if set, the number of optimizer steps, overriding `epochs`.
        per_device_batch_size: examples per device per micro-batch (KTO needs >= 2: its KL
            estimate pairs each example with a neighbour in the batch).
        gradient_accumulation_steps: micro-batches per optimizer step.
        max_grad_norm: gradient clipping norm.
        lr_scheduler_type: transformers scheduler name ("linear", "cosine", "constant"...).
        warmup_steps: linear warm-up steps.
        beta: DPO/KTO temperature: higher keeps the adapter closer to the reference.
        dpo_sft_weight: DPO only: weight of an SFT (NLL) term on the chosen answers added to
            the sigmoid preference loss (RPO). Plain DPO can lower both answers' likelihood and
            still win on preference (it degenerated on small data here); the SFT term anchors
            the chosen answer. 0 = plain DPO.
        desirable_weight: KTO weight of desirable (thumbs-up) examples.
        undesirable_weight: KTO weight of undesirable (thumbs-down) examples.
        max_length: tokens per example (prompt + completion), truncated from the end; with
            packing, the length of a packed row.
        packing: SFT only: pack examples into rows of `max_length` tokens (best-fit decreasing,
            padding-free: attention never crosses examples). Faster on short examples; an
            "epoch" then has fewer, fuller steps.
        padding_free: SFT only: flatten each batch into one row without padding (position ids
            restart per example, so attention never crosses examples). Same examples per step
            as padded batches, no compute spent on padding. Best with flash attention on GPU;
            on CPU (sdpa) it builds a block-diagonal mask over the whole batch.
        fused_loss: SFT only: TRL's chunked, fused LM-head loss, which never materialises the
            [tokens x vocab] logits (a memory saver for big vocabularies on GPU). Its CPU
            fallback is slow (~25% of a step on the tiny model), so None means: fused with
            CUDA, the model's own head and loss (transformers' Trainer.compute_loss) without.
        checkpoint_every_steps: save a resumable checkpoint into work_dir every N steps.
        keep_checkpoints: newest checkpoints kept (older ones are deleted).
        logging_steps: report progress (and log) every N steps.
        gradient_checkpointing: recompute activations in backward to save memory (slower); worth
            it for long sequences on big models, not for small ones.
        quantization: "none" or "qlora" (4-bit NF4 base, double quantization, bf16 compute).
            QLoRA needs CUDA and bitsandbytes; without them training raises
            QuantizationUnavailable (naming what is missing) unless quantization_fallback is
            "lora".
        quantization_fallback: "fail" (default) or "lora": where QLoRA cannot run, train plain
            LoRA instead; the result's quantization_reason says so.
        precision: "auto" (bf16 on a GPU that supports it, else fp32), "bf16" or "fp32".
        seed: seeds LoRA init, data order and dropout.
    """

    method: str = "sft"
    lora_r: int = _POLICY.lora.r
    lora_alpha: int = _POLICY.lora.alpha
    lora_dropout: float = _POLICY.lora.dropout
    target_modules: tuple[str, ...] = tuple(_POLICY.lora.target_modules)
    learning_rate: float | None = None
    epochs: float = _POLICY.epochs
    max_steps: int | None = _POLICY.max_steps
    per_device_batch_size: int = _POLICY.batch_size
    gradient_accumulation_steps: int = _POLICY.gradient_accumulation_steps
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = _POLICY.lr_scheduler
    warmup_steps: int = _POLICY.warmup_steps
    beta: float = _POLICY.beta
    dpo_sft_weight: float = _POLICY.dpo_sft_weight
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    max_length: int = 1024
    packing: bool = False
    padding_free: bool = False
    fused_loss: bool | None = None
    checkpoint_every_steps: int = _POLICY.checkpoint_every_steps
    keep_checkpoints: int = 2
    logging_steps: int = 1
    gradient_checkpointing: bool = False
    quantization: str = _POLICY.quantization
    quantization_fallback: str = _POLICY.quantization_fallback
    precision: str = "auto"
    seed: int = _POLICY.seed

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.quantization_fallback not in FALLBACKS:
            raise ValueError(f"quantization_fallback must be one of {FALLBACKS}, "
                             f"got {self.quantization_fallback!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        positive = ("lora_r", "per_device_batch_size", "gradient_accumulation_steps", "max_length",
                    "checkpoint_every_steps", "keep_checkpoints", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1 or None")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError("epochs must be > 0")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        if self.method == "kto" and self.per_device_batch_size < 2:
            raise ValueError("KTO needs per_device_batch_size >= 2 (its KL term pairs examples in a batch)")
        if (self.packing or self.padding_free or self.fused_loss is not None) and self.method != "sft":
            raise ValueError("packing, padding_free and fused_loss apply to SFT only")

    @property
    def resolved_learning_rate(self) -> float:
        """The learning rate used: the configured one or the method's LoRA default."""
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATE[self.method]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingConfig:
        """Build from a dict, refusing unknown keys (a typo must not silently train defaults)."""
        return from_mapping(cls, data, "TrainingConfig fields")


@dataclass(frozen=True)
class TrainResult:
    """What a finished training produced."""

    artifact_dir: Path
    sha256: str  # artifact_sha256(artifact_dir)
    method: str
    # train_loss (mean over the run), final_loss (last logged), steps, epoch, tokens (non-padding
    # input tokens seen, all processes), tokens_per_s and seconds (this call only), world_size and
    # backend (e.g. "gloo" under DDP on CPU, None single-process), eval_* if eval data.
    metrics: dict[str, Any]
    resumed_from_step: int | None
    library_versions: dict[str, str]
    quantization: str  # what was used: "none" | "qlora"
    quantization_reason: str | None  # why, when it differs from the request (or what qlora means)
    precision: str  # "bf16" | "fp32"
    precision_reason: str
    lora: dict[str, Any]  # the LoRA shape actually trained (a parent's, when continuing)
    lineage: dict[str, Any] = field(default_factory=dict)  # what lineage.json holds


# ---------------------------------------------------------------------------------------------
# Entry point


def train_adapter(
    *,
    base_model_dir: str | os.PathLike[str],
    data: Mapping[str, Sequence[Mapping[str, Any]] | None],
    config: TrainingConfig,
    out_dir: str | os.PathLike[str],
    work_dir: str | os.PathLike[str],
    parent_adapter_dir: str | os.PathLike[str] | None = None,
    progress: ProgressFn | None = None,
    lineage: Mapping[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train a LoRA adapter and write it to ``out_dir``; resume from ``work_dir`` checkpoints.

    ``data["train"]`` holds records in ``config.method``'s format, with prompts already rendered by
    the chat template (they are not templated again); ``data["eval"]`` (optional) is evaluated once
    at the end. ``parent_adapter_dir`` continues an earlier artifact's LoRA instead of a fresh one.
    ``progress`` gets {"step", "total_steps", "loss", "tokens_per_s", "eta_s", "epoch"} after each
    logging step (main process only). ``lineage`` (e.g. parent version, dataset hash) is merged
    into lineage.json. ``callbacks`` are extra transformers ``TrainerCallback`` instances.
    ``out_dir`` must not exist yet (artifacts are immutable); it appears complete or not at all.
    Raises QuantizationUnavailable, before loading anything, when ``config`` asks for QLoRA that
    this machine cannot run and allows no fallback.
    """
    quantization, quantization_reason = _choose_quantization(config)
    base_str = str(base_model_dir)  # the engine compares adapter_config's base with this string
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    parent = Path(parent_adapter_dir) if parent_adapter_dir is not None else None
    train_records = _validate_records(config.method, data.get("train"), "train")
    eval_raw = data.get("eval")
    eval_records = _validate_records(config.method, eval_raw, "eval") if eval_raw else None

    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        _check_out_dir(out_dir)
    parent_info = _check_parent(parent, base_str) if parent is not None else None

    _quiet_hub()
    import torch

    precision, precision_reason = _choose_precision(config.precision)
    data_sha = _records_sha256(train_records, eval_records)
    fingerprint = _run_fingerprint(base_str, config, data_sha, parent_info)
    ckpt_dir = work_dir / CHECKPOINTS_DIR
    if state.is_main_process:
        _prepare_work_dir(work_dir, fingerprint)
    state.wait_for_everyone()
    resume = latest_checkpoint(ckpt_dir)

    # TrainingArguments before the model: under DeepSpeed ZeRO-3 it arms sharded loading.
    args = _trainer_args(config, ckpt_dir, precision)
    tokenizer = _load_tokenizer(base_str)
    train_ds = _to_dataset(config.method, train_records, tokenizer, config.max_length)
    eval_ds = _to_dataset(config.method, eval_records, tokenizer, config.max_length) if eval_records else None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = _load_model(base_str, parent, config, quantization, dtype, state.local_process_index)
    tracker = _make_tracker(progress)
    trainer = _make_trainer(config, model, args, train_ds, eval_ds, tokenizer, [tracker, *callbacks])

    t0 = time.monotonic()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.monotonic() - t0
    metrics = _metrics(trainer, output, tracker, seconds)
    if eval_ds is not None:
        metrics.update({k: v for k, v in trainer.evaluate().items() if k.startswith("eval_")})

    resumed_from = _checkpoint_step(resume) if resume else None
    lora = _lora_summary(trainer)
    versions = library_versions(quantization)
    full_lineage = _lineage(
        lineage, base=base_str, config=config, lora=lora, parent=parent_info, data_sha=data_sha,
        versions=versions, metrics=metrics, resumed_from=resumed_from, precision=precision,
        quantization=quantization, quantization_reason=quantization_reason,
    )
    _export(trainer, work_dir / EXPORT_DIR, out_dir, base_str, full_lineage, state)
    return TrainResult(
        artifact_dir=out_dir,
        sha256=artifact_sha256(out_dir),
        method=config.method,
        metrics=metrics,
        resumed_from_step=resumed_from,
        library_versions=versions,
        quantization=quantization,
        quantization_reason=quantization_reason,
        precision=precision,
        precision_reason=precision_reason,
        lora=lora,
        lineage=full_lineage,
    )


# ---------------------------------------------------------------------------------------------
# Inputs


def _validate_records(method: str, records: Sequence[Mapping[str, Any]] | None,
                      split: str) -> list[dict[str, Any]]:
    """Keep only the method's keys; refuse missing/empty fields early, with the record index."""
    if not records:
        raise TrainingError(f"no {split} records")
    keys = REQUIRED_KEYS[method]
    out = []
    for i, rec in enumerate(records):
        missing = [k for k in keys if k not in rec]
        if missing:
            raise TrainingError(f"{split} record {i} lacks {', '.join(missing)} (a {method} record has "
                                f"{', '.join(keys)})")
        row = {k: rec[k] for k in keys}
        for k in keys:
            if k == "label":
                if not isinstance(row[k], bool):
                    raise TrainingError(f"{split} record {i}: label must be a bool, got {row[k]!r}")
            elif not isinstance(row[k], str) or not row[k]:
                raise TrainingError(f"{split} record {i}: {k} must be a non-empty string")
        out.append(row)
    return out


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an existing artifact; clear an empty placeholder and our stale temp dirs."""
    if out_dir.exists():
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        else:
            raise TrainingError(f"artifact directory {out_dir} already exists; artifacts are immutable")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Left behind by a crash between writing and renaming: never a complete artifact.
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _check_parent(parent: Path, base: str) -> dict[str, Any]:
    """Verify a parent artifact (no pickles, same base model) and describe it for the lineage."""

    try:
        sha = artifact_sha256(parent)
        verified = verify_artifact(parent, expected_sha256=sha, engine_base_model=base,
                                   max_lora_rank=1 << 16)
    except (OSError, ArtifactRejected) as e:
        raise TrainingError(f"parent adapter {parent} cannot be continued: {e}") from e
    return {"path": str(parent), "sha256": verified.sha256, "rank": verified.rank}


def _records_sha256(train: list[dict[str, Any]], eval_: list[dict[str, Any]] | None) -> str:
    blob = json.dumps({"train": train, "eval": eval_ or []}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ---------------------------------------------------------------------------------------------
# Hardware choices


def _quiet_hub() -> None:
    # TRL trainers report usage to the Hub on construction; a daemon training on private
    # feedback must not phone home (and these machines have no route out anyway).
    import huggingface_hub.constants as hub_constants
    from datasets.utils.logging import disable_progress_bar

    hub_constants.HF_HUB_DISABLE_TELEMETRY = True
    disable_progress_bar()  # per-map tqdm bars would flood the worker log


def _choose_precision(requested: str) -> tuple[str, str]:
    import torch

    if requested == "fp32":
        return "fp32", "requested"
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if requested == "bf16":
        return "bf16", "requested"
    if cuda_bf16:
        return "bf16", "auto: the GPU supports bf16"
    if torch.cuda.is_available():
        return "fp32", "auto: the GPU lacks bf16"
    # CPU autocast to bf16 measured no faster than fp32 for LoRA here and costs precision.
    return "fp32", "auto: CPU training runs in fp32"


def _choose_quantization(config: TrainingConfig) -> tuple[str, str | None]:
    plan = plan_quantization(config.quantization, config.quantization_fallback)
    if plan.failure:
        raise QuantizationUnavailable(plan.failure)
    assert plan.used is not None  # a plan that uses nothing carries its failure
    return plan.used, plan.reason


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """The installed version of each named package ("missing" where it is not installed)."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def library_versions(quantization: str = "none") -> dict[str, str]:
    """Versions of the training stack, for the lineage."""
    extra = ["bitsandbytes"] if quantization == "qlora" else []
    return package_versions(["torch", "transformers", "peft", "trl", "accelerate", "datasets", *extra])


# ---------------------------------------------------------------------------------------------
# Work dir, checkpoints, resume


def _run_fingerprint(base: str, config: TrainingConfig, data_sha: str,
                     parent: dict[str, Any] | None) -> str:
    """Identity of a run: checkpoints of another run in the same work dir are not resumed."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in _RESUMABLE_FIELDS}
    blob = json.dumps({"base": base, "config": cfg, "data": data_sha,
                       "parent": parent["sha256"] if parent else None}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _prepare_work_dir(work_dir: Path, fingerprint: str) -> None:
    """Keep checkpoints only if they belong to this run; drop incomplete ones."""
    work_dir.mkdir(parents=True, exist_ok=True)
    run_file = work_dir / RUN_FILE
    ckpt_dir = work_dir / CHECKPOINTS_DIR
    try:
        previous = json.loads(run_file.read_text()).get("fingerprint")
    except (OSError, ValueError):
        previous = None
    if previous != fingerprint and ckpt_dir.exists():
        log.warning("work dir %s holds checkpoints of another run; starting afresh", work_dir)
        shutil.rmtree(ckpt_dir)
    atomic_write_text(run_file, json.dumps({"fingerprint": fingerprint}, sort_keys=True) + "\n")
    # A checkpoint whose trainer_state.json (written last) is missing or torn was cut off by a
    # kill; resuming from it would fail, and the Trainer would later rotate it as if complete.
    for ckpt in _checkpoint_dirs(ckpt_dir):
        if not _checkpoint_complete(ckpt):
            log.warning("dropping incomplete checkpoint %s", ckpt)
            shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(work_dir / EXPORT_DIR, ignore_errors=True)


def _checkpoint_dirs(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=_checkpoint_step)


def _checkpoint_step(path: Path) -> int:
    return int(Path(path).name.rsplit("-", 1)[-1])


def _checkpoint_complete(path: Path) -> bool:
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and (path / WEIGHTS_FILE).is_file() and (path / "optimizer.pt").is_file()


def latest_checkpoint(ckpt_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint-N directory under ``ckpt_dir``, or None."""
    complete = [p for p in _checkpoint_dirs(Path(ckpt_dir)) if _checkpoint_complete(p)]
    return complete[-1] if complete else None


# ---------------------------------------------------------------------------------------------
# Model, data, trainer


def _load_tokenizer(base: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def _to_dataset(method: str, records: list[dict[str, Any]], tokenizer, max_length: int):
    """A datasets.Dataset whose token ids are exactly the engine's (one bos, no re-templating)."""
    from datasets import Dataset

    if method == "sft":
        return Dataset.from_list(_sft_rows(records, tokenizer, max_length))
    prefix = auto_special_prefix(tokenizer)
    rows = []
    for rec in records:
        row = dict(rec)
        row["prompt"] = _strip_prefix(rec["prompt"], prefix, tokenizer)
        rows.append(row)
    return Dataset.from_list(rows)


def _sft_rows(records: list[dict[str, Any]], tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """Pre-tokenized SFT rows: loss on the completion only, truncated to ``max_length``.

    Done here rather than by TRL so the ids are the engine's (the rendered prompt tokenized without
    special tokens) and so padding-free batches, which TRL leaves untruncated, still respect
    ``max_length``.
    """
    prefix = auto_special_prefix(tokenizer)
    rows = []
    for rec in records:
        prompt = engine_prompt(rec["prompt"], prefix)  # the dataset left the bos to TRL
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(prompt + rec["completion"], add_special_tokens=False)["input_ids"]
        # Tokens may merge across the boundary: the completion starts where the two diverge.
        n = _common_prefix_len(prompt_ids, ids)
        labels = [-100] * n + ids[n:]
        ids, labels = ids[:max_length], labels[:max_length]
        if any(label != -100 for label in labels):  # a prompt filling max_length teaches nothing
            rows.append({"input_ids": ids, "labels": labels})
    if not rows:
        raise TrainingError(f"every SFT record's prompt fills max_length={max_length}: nothing to learn")
    if len(rows) < len(records):
        log.warning("dropped %d SFT records whose prompt fills max_length=%d", len(records) - len(rows), max_length)
    return rows


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _strip_prefix(prompt: str, prefix: str, tokenizer) -> str:
    """The prompt as TRL's DPO/KTO get it: they tokenize plain text with special tokens, and the
    rendered prompt already starts with the template's bos, so the tokenizer's own prefix is
    left out (workers.dataset.training_prompt) and must give exactly the engine's ids."""
    stripped = training_prompt(prompt, prefix)
    if stripped != prompt and (tokenizer(stripped)["input_ids"]
                               != tokenizer(prompt, add_special_tokens=False)["input_ids"]):
        raise TrainingError("cannot reproduce the engine's tokenization of the rendered prompt")
    return stripped


def _load_model(base: str, parent: Path | None, config: TrainingConfig, quantization: str,
                dtype, device_index: int):
    """The base model with a trainable LoRA: the parent's (continued) or a fresh one."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantization == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["dtype"] = torch.bfloat16
        kwargs["device_map"] = {"": device_index}  # one full copy per process (DDP)
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if quantization == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing)
    # LoRA A is random: seed it here, before TRL's own set_seed, for a reproducible init.
    set_seed(config.seed)
    if parent is not None:
        return PeftModel.from_pretrained(model, str(parent), is_trainable=True)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",  # vLLM supports bias="none" only
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _trainer_args(config: TrainingConfig, ckpt_dir: Path, precision: str):
    """The TRL *Config for the method, with the settings common to all three."""
    import torch
    from trl import DPOConfig, KTOConfig, SFTConfig

    common: dict[str, Any] = dict(
        output_dir=str(ckpt_dir),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        per_device_train_batch_size=config.per_device_batch_size,
        per_device_eval_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.resolved_learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        weight_decay=0.0,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.checkpoint_every_steps,
        save_total_limit=config.keep_checkpoints,
        eval_strategy="no",  # eval data is evaluated once, after training
        report_to=[],
        disable_tqdm=True,
        bf16=precision == "bf16",  # TRL defaults bf16=True, even on CPU
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=config.gradient_checkpointing,  # TRL defaults it on
        seed=config.seed,
        data_seed=config.seed,
        include_num_input_tokens_seen="non_padding",
        # Every LoRA parameter gets a gradient every step: skip DDP's unused-parameter search.
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        max_length=config.max_length,
    )
    if config.method == "sft":
        # Rows arrive tokenized, labelled and truncated (_sft_rows). TRL refuses max_length with
        # padding-free batches unless packing: the rows already respect it.
        if config.padding_free and not config.packing:
            common["max_length"] = None
        return SFTConfig(**common, packing=config.packing, padding_free=config.padding_free)
    if config.method == "dpo":
        if config.dpo_sft_weight > 0:
            return DPOConfig(**common, beta=config.beta, loss_type=["sigmoid", "sft"],
                             loss_weights=[1.0, config.dpo_sft_weight])
        return DPOConfig(**common, beta=config.beta)
    return KTOConfig(**common, beta=config.beta, desirable_weight=config.desirable_weight,
                     undesirable_weight=config.undesirable_weight)


def _make_trainer(config: TrainingConfig, model, args, train_ds, eval_ds, tokenizer,
                  callbacks: list[Any]):
    import torch
    from transformers import PrinterCallback
    from trl import DPOTrainer, KTOTrainer

    if config.method == "sft":
        fused = config.fused_loss if config.fused_loss is not None else torch.cuda.is_available()
        cls = _sft_trainer_class(fused)
    else:
        cls = {"dpo": DPOTrainer, "kto": KTOTrainer}[config.method]
    # A PeftModel (never peft_config): DPO/KTO then use a frozen copy of the starting adapter as
    # the reference ("ref" adapter), i.e. the parent when continuing, the base when fresh.
    trainer = cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                  processing_class=tokenizer, callbacks=callbacks)
    # With tqdm off the Trainer prints every log dict to stdout; progress goes through ours.
    trainer.remove_callback(PrinterCallback)
    return trainer


def _sft_trainer_class(fused_loss: bool):
    """TRL's SFTTrainer, or one computing the loss with the model's own LM head."""
    from transformers import Trainer
    from trl import SFTTrainer

    if fused_loss:
        return SFTTrainer

    class PlainLossSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss is transformers' Trainer.compute_loss (no entropy/accuracy logs)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # Training never caches; a cache would also stop padding-free batches from getting
            # their per-example attention mask.
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return PlainLossSFTTrainer


# ---------------------------------------------------------------------------------------------
# Progress


def _make_tracker(progress: ProgressFn | None, clock: Callable[[], float] = time.monotonic):
    """A TrainerCallback that reports progress and remembers the last loss."""
    from transformers import TrainerCallback

    class _Tracker(TrainerCallback):
        last_loss: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            # On resume the state is already restored: rates cover this call's steps only.
            self.t0 = clock()
            self.step0 = state.global_step
            self.tokens0 = state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return  # the end-of-training summary and eval logs
            self.last_loss = float(logs["loss"])
            if progress is None or not state.is_world_process_zero:
                return
            elapsed = max(clock() - self.t0, 1e-9)
            done = state.global_step - self.step0
            rate = done / elapsed if done > 0 else None
            progress({
                "step": state.global_step,
                "total_steps": state.max_steps,
                "loss": self.last_loss,
                "tokens_per_s": (state.num_input_tokens_seen - self.tokens0) / elapsed,
                "eta_s": (state.max_steps - state.global_step) / rate if rate else None,
                "epoch": state.epoch,
                "learning_rate": logs.get("learning_rate"),
            })

    return _Tracker()


def _metrics(trainer, output, tracker, seconds: float) -> dict[str, Any]:
    state = trainer.state
    tokens = int(state.num_input_tokens_seen)
    session_tokens = tokens - int(getattr(tracker, "tokens0", 0))
    session_steps = state.global_step - int(getattr(tracker, "step0", 0))
    return {
        "train_loss": float(output.training_loss),
        "final_loss": tracker.last_loss,
        "steps": int(state.global_step),
        "epoch": float(state.epoch or 0.0),
        "tokens": tokens,
        "tokens_per_s": session_tokens / seconds if seconds > 0 else 0.0,
        "steps_per_s": session_steps / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
        "world_size": int(trainer.accelerator.num_processes),
        # The backend accelerate asked torch.distributed for (dist.get_backend() says "undefined"
        # when it was initialised per device type).
        "backend": trainer.accelerator.state.backend if trainer.accelerator.num_processes > 1 else None,
    }


# ---------------------------------------------------------------------------------------------
# Output


def _lora_summary(trainer) -> dict[str, Any]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    cfg = model.peft_config["default"]
    targets = cfg.target_modules
    return {
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(targets) if not isinstance(targets, str) else targets,
    }


def _lineage(caller: Mapping[str, Any] | None, *, base: str, config: TrainingConfig,
             lora: dict[str, Any], parent: dict[str, Any] | None, data_sha: str,
             versions: dict[str, str], metrics: dict[str, Any], resumed_from: int | None,
             precision: str, quantization: str, quantization_reason: str | None) -> dict[str, Any]:
    """The caller's lineage (parent version, dataset hash...) plus how this adapter was trained."""
    out = dict(caller or {})
    out.setdefault("format", LINEAGE_FORMAT)
    out["training"] = {
        "base_model": base,
        "method": config.method,
        "config": config.to_dict(),
        "learning_rate": config.resolved_learning_rate,
        "lora": lora,
        "parent_adapter": parent,
        "train_data_sha256": data_sha,
        "precision": precision,
        "quantization": quantization,
        "quantization_reason": quantization_reason,
        "resumed_from_step": resumed_from,
        "metrics": metrics,
        "library_versions": versions,
        "finished_at": datetime.now(UTC).isoformat(),
    }
    return out


def _export(trainer, export_dir: Path, out_dir: Path, base: str, lineage: dict[str, Any],
            state) -> None:
    """Write the artifact atomically: only the adapter weights, its config and the lineage."""
    # Every process calls save_model (DeepSpeed/FSDP gather shards collectively); it also writes
    # training_args.bin, tokenizer files and a model card, which stay in the scratch dir.
    trainer.save_model(str(export_dir))
    if state.is_main_process:
        tmp = staging_dir(out_dir)  # readable by all: the engine may run as another user
        try:
            shutil.copyfile(export_dir / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
            _write_adapter_config(export_dir / CONFIG_FILE, tmp / CONFIG_FILE, base)
            (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True, default=str) + "\n")
            publish_dir(tmp, out_dir)  # fails rather than merge into an existing artifact
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(export_dir, ignore_errors=True)
    state.wait_for_everyone()


def _write_adapter_config(src: Path, dst: Path, base: str) -> None:
    cfg = json.loads(src.read_text())
    cfg["base_model_name_or_path"] = base
    if cfg.get("modules_to_save"):
        raise TrainingError(f"adapter has modules_to_save={cfg['modules_to_save']!r}; vLLM refuses it")
    dst.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Command line (also what `accelerate launch -m workers.training` runs in every process)


def _run_spec(spec: Mapping[str, Any]) -> TrainResult:
    data_paths = spec["data"]
    data = {"train": read_jsonl(data_paths["train"])}
    if data_paths.get("eval"):
        data["eval"] = read_jsonl(data_paths["eval"])
    parent = spec.get("parent_adapter_dir", spec.get("parent"))
    return train_adapter(
        base_model_dir=spec["base_model_dir"],
        data=data,
        config=TrainingConfig.from_dict(spec.get("config", {})),
        out_dir=spec["out_dir"],
        work_dir=spec["work_dir"],
        parent_adapter_dir=parent,
        lineage=spec.get("lineage"),
        progress=_progress_writer(spec.get("progress_path")),
    )


def _progress_writer(path: str | None) -> ProgressFn:
    """Progress events as JSON lines: appended to path (what the trainer backend reads), else
    printed to stderr."""
    def write(event: dict[str, Any]) -> None:
        line = json.dumps(event, sort_keys=True, default=str) + "\n"
        if path is None:
            print(json.dumps({"progress": event}), file=sys.stderr, flush=True)
            return
        with open(path, "a") as f:  # one write of one whole line: a reader never sees half
            f.write(line)

    return write


def _write_error(error_dir: str | None, exc: BaseException) -> None:
    """Record why this process failed (error-<rank>.json), for the backend to tell a training
    error from a killed process. Best effort: the disk may be what failed."""
    if error_dir is None:
        return
    rank = os.environ.get("RANK", "0")  # set by accelerate/torchrun in each process
    record = {"type": type(exc).__name__, "message": str(exc)[:2000], "rank": int(rank),
              "errno": getattr(exc, "errno", None)}
    try:
        atomic_write_text(Path(error_dir) / f"error-{rank}.json", json.dumps(record) + "\n")
    except OSError:
        log.warning("could not record the training error in %s", error_dir)


def result_to_dict(result: TrainResult) -> dict[str, Any]:
    """JSON-ready form of a TrainResult."""
    d = dataclasses.asdict(result)
    d["artifact_dir"] = str(result.artifact_dir)
    return d


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m workers.training --spec spec.json`: train as the spec says, print the result."""
    parser = argparse.ArgumentParser(prog="python -m workers.training", description=main.__doc__)
    parser.add_argument("--spec", required=True, help="JSON spec file (see the module docstring)")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(ns.spec).read_text())
    try:
        result = _run_spec(spec)
    except Exception as exc:
        _write_error(spec.get("error_dir"), exc)
        raise
    from accelerate import PartialState

    if PartialState().is_main_process:
        payload = json.dumps(result_to_dict(result), indent=2, sort_keys=True, default=str)
        if spec.get("result_path"):
            atomic_write_text(spec["result_path"], json.dumps(json.loads(payload), sort_keys=True) + "\n")
        print(payload, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
