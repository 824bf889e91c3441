"""workers.recipe: the one mapping from an alias's policy to the worker's configs, and the one
place their defaults come from (service.domain.policy)."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime
from pathlib import Path

from service.domain.policy import DatasetPolicy, Policy, TrainingPolicy
from workers.dataset import DatasetConfig, RatedInteraction
from workers.recipe import dataset_config, human_raters, training_config
from workers.training import TrainingConfig

ROOT = Path(__file__).resolve().parents[2]

# Policy field (dotted, under `training`) -> TrainingConfig field.
TRAINING_FIELDS = {
    "lora.r": "lora_r",
    "lora.alpha": "lora_alpha",
    "lora.dropout": "lora_dropout",
    "lora.target_modules": "target_modules",
    "learning_rate": "learning_rate",
    "epochs": "epochs",
    "max_steps": "max_steps",
    "batch_size": "per_device_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "lr_scheduler": "lr_scheduler_type",
    "warmup_steps": "warmup_steps",
    "beta": "beta",
    "dpo_sft_weight": "dpo_sft_weight",
    "max_length": "max_length",
    "checkpoint_every_steps": "checkpoint_every_steps",
    "quantization": "quantization",
    "quantization_fallback": "quantization_fallback",
    "seed": "seed",
}
# Training policy fields a TrainingConfig does not take, and who uses them instead.
TRAINING_ELSEWHERE = {"method": "the dataset build (DatasetConfig.method)",
                      "start_from": "the train stage, choosing the parent adapter"}
# TrainingConfig defaults that differ from the policy's on purpose (its docstring lists them).
TRAINING_DIFFERENT = {"learning_rate", "max_length"}

# Policy field (dotted, from the top) -> DatasetConfig field.
DATASET_FIELDS = {
    "dataset.heldout_fraction": "heldout_fraction",
    "dataset.replay_fraction": "replay_fraction",
    "dataset.max_chars": "max_chars",
    "dataset.min_examples": "min_examples",
    "dataset.max_rater_share": "max_rater_share",
    "training.method": "method",
    "training.seed": "seed",
    "judge.max_share": "max_judge_share",
}
DATASET_ELSEWHERE = {"redactor": "the train stage (workers.redaction.get_redactor)"}
DATASET_DIFFERENT = {"max_rater_share"}  # None: the mapping applies it where two raters rate

CUSTOM = Policy.model_validate({
    "training": {
        "method": "dpo", "start_from": "base",
        "lora": {"r": 16, "alpha": 64, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "o_proj"]},
        "learning_rate": 1e-4, "epochs": 3.0, "max_steps": 7, "batch_size": 2,
        "gradient_accumulation_steps": 3, "lr_scheduler": "cosine", "warmup_steps": 5, "beta": 0.2,
        "dpo_sft_weight": 0.5, "max_length": 512, "checkpoint_every_steps": 7,
        "quantization": "qlora", "quantization_fallback": "lora", "seed": 3,
    },
    "dataset": {"heldout_fraction": 0.3, "replay_fraction": 0.4, "max_chars": 1234,
                "min_examples": 9, "max_rater_share": 0.3, "redactor": "none"},
    "judge": {"max_share": 0.1},
})


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _plain(value):
    return tuple(value) if isinstance(value, list) else value


def _rated(i: int, rater: str, key: str, source: str = "human") -> RatedInteraction:
    return RatedInteraction(interaction_id=f"00000000-0000-4000-8000-{i:012d}",
                            messages=[{"role": "user", "content": "hi"}], response_text="hello",
                            rating="up", correction=None, rater_id=rater,
                            created_at=datetime(2026, 1, 1, tzinfo=UTC), posted_by=key, source=source)


TWO_RATERS = [_rated(1, "ann", "key1"), _rated(2, "bob", "key2")]


def _leaf_fields(model: type, prefix: str = "") -> set[str]:
    out = set()
    for name, info in model.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and hasattr(sub, "model_fields"):
            out |= _leaf_fields(sub, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


def test_every_policy_field_has_a_place():
    """A new policy field must be mapped (or say who uses it), or it would never reach a run."""
    assert _leaf_fields(TrainingPolicy) == set(TRAINING_FIELDS) | set(TRAINING_ELSEWHERE)
    assert ({f"dataset.{f}" for f in DatasetPolicy.model_fields}
            == {k for k in DATASET_FIELDS if k.startswith("dataset.")}
            | {f"dataset.{f}" for f in DATASET_ELSEWHERE})


def test_training_config_carries_each_policy_field():
    config = training_config(CUSTOM, "dpo")
    default = Policy()
    for policy_field, config_field in TRAINING_FIELDS.items():
        value = _get(CUSTOM.training, policy_field)
        assert value != _get(default.training, policy_field), policy_field  # the test tests
        assert getattr(config, config_field) == _plain(value), policy_field


def test_training_config_method_length_and_kto_weights():
    config = training_config(CUSTOM, "kto", max_length=300, desirable_weight=1.5,
                             undesirable_weight=0.75)
    assert (config.method, config.max_length) == ("kto", 300)  # the engine's bound wins
    assert (config.desirable_weight, config.undesirable_weight) == (1.5, 0.75)
    assert training_config(Policy(), "sft").max_length == TrainingConfig().max_length


def test_dataset_config_carries_each_policy_field():
    config = dataset_config(CUSTOM, TWO_RATERS, max_tokens=256)
    default = Policy()
    for policy_field, config_field in DATASET_FIELDS.items():
        value = _get(CUSTOM, policy_field)
        assert value != _get(default, policy_field), policy_field
        assert getattr(config, config_field) == value, policy_field
    assert config.max_key_share == CUSTOM.dataset.max_rater_share
    assert config.max_tokens == 256


def test_rater_caps_apply_only_where_two_rate():
    one = dataset_config(CUSTOM, [_rated(1, "ann", "key1"), _rated(2, "ann", "key1")])
    assert (one.max_rater_share, one.max_key_share) == (None, None)
    one_key = dataset_config(CUSTOM, [_rated(1, "ann", "key1"), _rated(2, "bob", "key1")])
    assert (one_key.max_rater_share, one_key.max_key_share) == (0.3, None)
    # The judge is capped on its own: its ratings make no second rater.
    judged = dataset_config(CUSTOM, [_rated(1, "ann", "key1"), _rated(2, "judge", "key2", "judge")])
    assert (judged.max_rater_share, judged.max_key_share) == (None, None)
    assert human_raters(TWO_RATERS) == {("key1", "ann"), ("key2", "bob")}


def test_dataset_config_overrides():
    gate = dataset_config(CUSTOM, max_tokens=64, method="auto", replay_fraction=0.0, min_examples=1)
    assert (gate.method, gate.replay_fraction, gate.min_examples) == ("auto", 0.0, 1)
    assert gate.heldout_fraction == CUSTOM.dataset.heldout_fraction


def test_default_policy_gives_the_documented_defaults():
    assert dataset_config(Policy()) == DatasetConfig()
    # Only the differences TrainingConfig's docstring lists.
    mapped, own = training_config(Policy(), "sft"), TrainingConfig()
    differ = {f.name for f in dataclasses.fields(TrainingConfig)
              if getattr(mapped, f.name) != getattr(own, f.name)}
    assert differ == {"learning_rate"}
    assert mapped.learning_rate == TrainingPolicy().learning_rate and own.learning_rate is None


def test_no_second_default_drifts():
    """Each config default with a policy counterpart is the policy's, but for the documented
    differences, which the config's docstring names."""
    policy = Policy()
    own = TrainingConfig()
    for policy_field, config_field in TRAINING_FIELDS.items():
        same = getattr(own, config_field) == _plain(_get(policy.training, policy_field))
        assert same != (config_field in TRAINING_DIFFERENT), config_field
    for name in (*TRAINING_DIFFERENT, "method"):
        assert re.search(rf"^\s+- {name}:", TrainingConfig.__doc__, re.M), name
    data = DatasetConfig()
    for policy_field, config_field in DATASET_FIELDS.items():
        same = getattr(data, config_field) == _get(policy, policy_field)
        assert same != (config_field in DATASET_DIFFERENT), config_field
    for name in (*DATASET_DIFFERENT, "max_tokens"):
        assert re.search(rf"^\s+- .*\b{name}\b.*:", DatasetConfig.__doc__, re.M), name


def test_configs_are_built_from_a_policy_in_one_place():
    """The worker and the benches go through workers.recipe: nowhere else in product or bench
    code builds a TrainingConfig or DatasetConfig by hand."""
    allowed = {ROOT / "workers" / "recipe.py", ROOT / "workers" / "training.py",
               ROOT / "workers" / "dataset.py"}
    found = []
    for folder in ("service", "workers", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            if path not in allowed and re.search(r"\b(TrainingConfig|DatasetConfig)\(", path.read_text()):
                found.append(str(path.relative_to(ROOT)))
    assert found == []
