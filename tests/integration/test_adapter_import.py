"""`flywheel adapters import`: a PEFT adapter made on the tiny model becomes a candidate version
with a run for the worker to gate; what cannot be served is refused with the reason, and nothing
is recorded for it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from service.db.models import Adapter, AdapterVersion, AuditEvent, TrainingRun
from service.engine.artifact import verify_artifact
from tests.helpers.cli import flywheel
from tests.helpers.stack import flywheel_env
from tests.helpers.vllm import make_random_lora


@pytest.fixture(scope="module")
def peft_adapter(tiny_model, tmp_path_factory) -> Path:
    return make_random_lora(tiny_model, tmp_path_factory.mktemp("peft") / "adapter")


@pytest.fixture(scope="module")
def cli_env(db_url, broker_url, stack_root, tiny_model):
    """The CLI's environment on the tiny model (in place of tests/helpers/cli.py's)."""
    env = flywheel_env(database_url=db_url, broker_url=broker_url, base_model=str(tiny_model),
                       artifact_dir=str(stack_root / "adapter-import-artifacts"),
                       data_dir=str(stack_root / "cli-adapter-import"),
                       vllm_urls="http://127.0.0.1:9")
    return {**env, "COLUMNS": "200"}


def _copy(src: Path, dest: Path, **config) -> Path:
    shutil.copytree(src, dest)
    if config:
        cfg = json.loads((dest / "adapter_config.json").read_text())
        (dest / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    return dest


def _rows(db_sessions, tenant, alias):
    with db_sessions() as s:
        adapter = s.scalars(select(Adapter).where(Adapter.tenant_id == tenant,
                                                  Adapter.alias == alias)).one()
        versions = list(s.scalars(select(AdapterVersion).where(AdapterVersion.adapter_id == adapter.id)))
        run_list = list(s.scalars(select(TrainingRun).where(TrainingRun.adapter_id == adapter.id)))
    return adapter, versions, run_list


def test_an_adapter_trained_elsewhere_becomes_a_candidate_with_a_run_to_gate(
        peft_adapter, cli_env, db_sessions, make_alias, tenant, tiny_model, tmp_path):
    alias = make_alias(tenant)
    # Trained elsewhere: it names its base by a hub id, and its directory holds more than PEFT's
    # two files (a trainer's pickled arguments beside safetensors weights: never read).
    src = _copy(peft_adapter, tmp_path / "from-notebook",
                base_model_name_or_path=f"someorg/{Path(tiny_model).name}")
    (src / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (src / "README.md").write_text("trained in a notebook")
    r = flywheel(cli_env, "adapters", "import", alias, str(src), "--tenant", tenant,
                 "--note", "notebook run 7", timeout=180)
    assert r.returncode == 0, (r.stdout, r.stderr)
    said = " ".join(r.stdout.split())
    assert f"{tenant}--{alias}--v1" in said and "base: same name" in said
    assert "not taken: README.md, training_args.bin" in said

    adapter, [version], [run] = _rows(db_sessions, tenant, alias)
    assert version.status == "candidate" and version.run_id == run.id
    assert (run.state, run.method, run.candidate_version_id) == ("training", "import", version.id)
    assert run.trigger["reason"] == "adapter_import" and run.trigger["note"] == "notebook run 7"
    assert run.feedback_seq_to == adapter.feedback_watermark  # it consumes no feedback
    source = version.lineage["source"]
    assert source["original_base_model"] == f"someorg/{Path(tiny_model).name}"
    assert source["base_check"] == "same name" and source["shapes_checked"] is True
    assert set(source["original_sha256"]) == {"adapter_config.json", "adapter_model.safetensors"}
    # The stored copy names the engine's base and verifies as every version must.
    stored = Path(version.artifact_path)
    assert sorted(p.name for p in stored.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    verify_artifact(stored, expected_sha256=version.sha256, engine_base_model=str(tiny_model),
                    max_lora_rank=16)
    with db_sessions() as s:
        assert s.scalars(select(AuditEvent).where(AuditEvent.tenant_id == tenant,
                                                  AuditEvent.action == "adapter.imported")).one()
    # One run at a time per alias: a second import waits for this one to settle.
    again = flywheel(cli_env, "adapters", "import", alias, str(src), "--tenant", tenant, timeout=180)
    assert again.returncode == 1 and "has an active run" in " ".join(again.stderr.split())


@pytest.mark.parametrize("case, code, needle", [
    ("pickle", "pickle", "the weights are a pickle (adapter_model.bin)"),
    ("rank", "rank_too_large", "r=32 exceeds the engine's max_lora_rank 16"),
    ("base", "wrong_base", "base_model_name_or_path is 'someorg/another-model'"),
    ("modules", "wrong_modules", "which the base model does not have"),
    ("shape", "wrong_shape", "it was trained on another model size"),
    ("nan", "non_finite", "non-finite values"),
    ("full", "bad_weights", "is not a LoRA weight"),
])
def test_what_the_engine_cannot_serve_is_refused_and_nothing_recorded(
        case, code, needle, peft_adapter, cli_env, db_sessions, make_alias, tenant, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    alias = make_alias(tenant)
    src = _copy(peft_adapter, tmp_path / case)
    weights = src / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    if case == "pickle":
        weights.rename(src / "adapter_model.bin")
    elif case == "rank":
        (src / "adapter_config.json").write_text(json.dumps(
            {**json.loads((src / "adapter_config.json").read_text()), "r": 32}))
    elif case == "base":
        cfg = json.loads((src / "adapter_config.json").read_text())
        (src / "adapter_config.json").write_text(json.dumps(
            {**cfg, "base_model_name_or_path": "someorg/another-model"}))
    elif case == "modules":
        save_file({k.replace("q_proj", "qkv_proj"): v for k, v in tensors.items()}, str(weights))
    elif case == "shape":
        save_file({k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v
                   for k, v in tensors.items()}, str(weights))
    elif case == "nan":
        first = sorted(tensors)[0]
        save_file({**tensors, first: torch.full_like(tensors[first], float("nan"))}, str(weights))
    elif case == "full":
        save_file({**tensors, "model.embed_tokens.weight": torch.zeros(4, 4)}, str(weights))
    r = flywheel(cli_env, "adapters", "import", alias, str(src), "--tenant", tenant, timeout=180)
    assert r.returncode == 2, (r.stdout, r.stderr)
    said = " ".join(r.stderr.split())  # rich wraps long lines
    assert needle in said and f"({code})" in said
    _, versions, run_list = _rows(db_sessions, tenant, alias)
    assert versions == [] and run_list == []
    if case == "base":  # the same model under another name, said so by the importer
        r = flywheel(cli_env, "adapters", "import", alias, str(src), "--tenant", tenant, "--same-base",
                     timeout=180)
        assert r.returncode == 0 and "asserted by the importer" in " ".join(r.stdout.split())
