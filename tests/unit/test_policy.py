"""Policy files: merging, validation errors naming file and field, reload on change."""

from __future__ import annotations

import os
import time

import pytest

from service.domain.policy import Policy, PolicyError, PolicyStore


def write(d, name, text):
    (d / f"{name}.yaml").write_text(text)


def test_alias_file_overrides_default_and_tenant_file_wins(tmp_path):
    write(tmp_path, "default", "trigger: {min_new_ratings: 40}\napproval: manual\n")
    write(tmp_path, "support-bot", "tenants: '*'\ntrigger: {min_up: 5}\n")
    write(tmp_path, "acme--support-bot", "approval: auto\n")
    store = PolicyStore(tmp_path)
    p = store.for_alias("support-bot")
    assert (p.trigger.min_new_ratings, p.trigger.min_up, p.approval) == (40, 5, "manual")
    assert store.for_alias("support-bot", "acme").approval == "auto"
    assert store.for_alias("other").trigger.min_up == 0


@pytest.mark.parametrize("text, field", [
    ("trigger: {min_new_ratings: 0}\n", "trigger.min_new_ratings"),
    ("training: {method: magic}\n", "training.method"),
    ("trigger: {min_new_ratingz: 5}\n", "trigger.min_new_ratingz"),
    ("canary: {share: 1.5}\n", "canary.share"),
    ("approval: maybe\n", "approval"),
    ("export: {on_promotion: [{format: gguf}]}\n", "export.on_promotion.0"),
    ("export: {on_promotion: [{format: gguf, quant: q3}]}\n", "export.on_promotion.0.quant"),
    ("export: {tolerance: {max_nll_delta: -1}}\n", "export.tolerance.max_nll_delta"),
])
def test_bad_field_names_file_and_field(tmp_path, text, field):
    write(tmp_path, "default", "approval: manual\n")
    write(tmp_path, "support-bot", "tenants: '*'\n" + text)
    with pytest.raises(PolicyError) as err:
        PolicyStore(tmp_path)
    assert "support-bot.yaml" in str(err.value) and f"field {field}" in str(err.value)


def test_a_shared_alias_file_applies_only_to_the_tenants_it_names(tmp_path):
    write(tmp_path, "default", "approval: manual\n")
    write(tmp_path, "support-bot", "tenants: [acme]\napproval: auto\n"
          "gate: {golden: [{prompt: acme's secret prompt}]}\n")
    store = PolicyStore(tmp_path)
    assert store.for_alias("support-bot", "acme").approval == "auto"
    globex = store.for_alias("support-bot", "globex")
    assert globex.approval == "manual" and globex.gate.golden == []  # nothing of acme's shows
    assert store.source_for("support-bot", "globex") == ["default.yaml"]
    assert store.source_for("support-bot", "acme") == ["default.yaml", "support-bot.yaml"]


@pytest.mark.parametrize("name, text, message", [
    ("support-bot", "approval: auto\n", "must name the tenants it applies to"),
    ("support-bot", "tenants: []\n", "a list of tenant ids"),
    ("support-bot", "tenants: acme\n", "a list of tenant ids"),
    ("acme--support-bot", "tenants: [acme]\n", "only a shared alias file"),
    ("default", "tenants: '*'\n", "only a shared alias file"),
])
def test_tenants_is_required_on_shared_files_and_refused_elsewhere(tmp_path, name, text, message):
    write(tmp_path, name, text)
    with pytest.raises(PolicyError, match=message) as err:
        PolicyStore(tmp_path)
    assert f"{name}.yaml" in str(err.value) and "field tenants" in str(err.value)


def test_invalid_yaml_and_non_mapping_are_refused(tmp_path):
    write(tmp_path, "default", "trigger: [unclosed\n")
    with pytest.raises(PolicyError, match="default.yaml: not valid YAML"):
        PolicyStore(tmp_path)
    write(tmp_path, "default", "- a list\n")
    with pytest.raises(PolicyError, match="top level must be a mapping"):
        PolicyStore(tmp_path)


def test_changed_file_takes_effect_without_restart_and_bad_edit_keeps_last_good(tmp_path):
    write(tmp_path, "default", "trigger: {min_new_ratings: 10}\n")
    store = PolicyStore(tmp_path)
    assert store.for_alias("a").trigger.min_new_ratings == 10
    write(tmp_path, "default", "trigger: {min_new_ratings: 25}\n")
    os.utime(tmp_path / "default.yaml", (time.time() + 5, time.time() + 5))
    store._checked_at = 0  # skip the once-a-second stat throttle
    assert store.for_alias("a").trigger.min_new_ratings == 25
    write(tmp_path, "default", "trigger: {min_new_ratings: -1}\n")
    os.utime(tmp_path / "default.yaml", (time.time() + 10, time.time() + 10))
    store._checked_at = 0
    assert store.for_alias("a").trigger.min_new_ratings == 25


def test_repository_policies_are_valid():
    store = PolicyStore(os.path.join(os.path.dirname(__file__), "..", "..", "policies"))
    assert store.for_alias("anything").approval in ("auto", "manual")


def test_export_policy_names_why_a_spec_is_refused(tmp_path):
    write(tmp_path, "default", "export: {on_promotion: [{format: merged, quant: q8_0}]}\n")
    with pytest.raises(PolicyError, match="merged export is not quantized"):
        PolicyStore(tmp_path)
    write(tmp_path, "default", "export: {on_promotion: [{format: gguf, quant: q8_0}], "
                               "fallback: true}\n")
    policy = PolicyStore(tmp_path).for_alias("x")
    assert [(e.format, e.quant) for e in policy.export.on_promotion] == [("gguf", "q8_0")]
    assert policy.export.fallback is True and policy.export.tolerance.min_token_agreement == 0.95


def test_training_examples_are_limited_by_the_engines_context_unless_the_policy_asks_less():
    from workers.recipe import example_token_limit

    def policy(max_length):
        return Policy.model_validate({"training": {"max_length": max_length}} if max_length else {})

    assert example_token_limit(policy(None), 2048) == 2048
    assert example_token_limit(policy(512), 2048) == 512
    # A policy asking more than the engine serves is capped: such an example could never be
    # asked of the model.
    assert example_token_limit(policy(4096), 2048) == 2048
