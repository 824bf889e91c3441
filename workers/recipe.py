"""An alias's policy as a run's settings: the one mapping from service.domain.policy.Policy to the
dataset build's DatasetConfig and the training's TrainingConfig.

The train stage, the imported adapter's gate and the benches all go through it, so each rule
of the policy (the caps per rater and per posting key, the token bound per example) is written
once. The defaults live in the policy; the worker-side configs take theirs from it and list
where they differ.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from service.domain.policy import Policy
from workers.dataset import JUDGE, DatasetConfig, RatedInteraction
from workers.training import TrainingConfig

__all__ = ["dataset_config", "example_token_limit", "human_raters", "training_config"]


def example_token_limit(policy: Policy, context_len: int) -> int:
    """Tokens per training example: the policy's max_length, never above the engine's context
    (an example the engine cannot serve teaches nothing it will be asked)."""
    return min(policy.training.max_length or context_len, context_len)


def human_raters(rated: Iterable[RatedInteraction]) -> set[tuple[str, str]]:
    """The distinct human raters in ``rated``, as (posting key, rater id); the judge is capped
    on its own (judge.max_share)."""
    return {(r.posted_by, r.rater_id) for r in rated if r.source != JUDGE}


def dataset_config(policy: Policy, rated: Iterable[RatedInteraction] = (), *,
                   max_tokens: int | None = None, **overrides: Any) -> DatasetConfig:
    """The dataset build's settings for the ratings ``rated`` under ``policy``.

    The caps per rater and per posting key (dataset.max_rater_share) apply only where ``rated``
    names at least two human raters, or two posting keys: a lone rater, or the one key a product
    posts with, is not capped against itself. ``max_tokens`` bounds an example in tokens
    (example_token_limit). ``overrides`` are DatasetConfig fields the caller decides (the
    imported adapter's gate: every rating held out or not, no replay, one example enough).
    """
    raters = human_raters(rated)
    d = policy.dataset
    fields: dict[str, Any] = {
        "method": policy.training.method,
        "heldout_fraction": d.heldout_fraction,
        "replay_fraction": d.replay_fraction,
        "max_chars": d.max_chars,
        "max_tokens": max_tokens,
        "max_rater_share": d.max_rater_share if len(raters) >= 2 else None,
        "max_key_share": d.max_rater_share if len({key for key, _ in raters}) >= 2 else None,
        "min_examples": d.min_examples,
        "max_judge_share": policy.judge.max_share,
        "seed": policy.training.seed,
    }
    return DatasetConfig(**{**fields, **overrides})


def training_config(policy: Policy, method: str, *, max_length: int | None = None,
                    desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> TrainingConfig:
    """The training's settings for ``method`` (the dataset build's choice) under ``policy``.

    ``max_length``: tokens per example (example_token_limit); unset, the policy's
    training.max_length, and without one TrainingConfig's own. ``desirable_weight`` and
    ``undesirable_weight``: KTO's class weights, from the built dataset.
    """
    t = policy.training
    length = max_length or t.max_length
    unset_or_length: dict[str, Any] = {"max_length": length} if length else {}
    return TrainingConfig(
        method=method, lora_r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
        target_modules=tuple(t.lora.target_modules), learning_rate=t.learning_rate,
        epochs=t.epochs, max_steps=t.max_steps, per_device_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_steps, beta=t.beta,
        dpo_sft_weight=t.dpo_sft_weight, desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight, **unset_or_length,
        checkpoint_every_steps=t.checkpoint_every_steps, quantization=t.quantization,
        quantization_fallback=t.quantization_fallback, seed=t.seed,
    )
