"""Adapter artifact verification against real small LoRA adapters written to tmp dirs."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from service.engine.artifact import (
    ArtifactRejected,
    VerifiedArtifact,
    artifact_sha256,
    same_base_model,
    verify_artifact,
)

HIDDEN = 64
LAYERS = 2
MAX_RANK = 16


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    d = tmp_path / "base-model"
    d.mkdir()
    return d


def make_adapter(d: Path, base: str, *, r: int = 8, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                 tensors: dict[str, torch.Tensor] | None = None, **config: Any) -> Path:
    """Write a PEFT-shaped LoRA adapter: A is (r, in), B is (out, r), keys as PEFT saves them."""
    d.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = {}
        for layer in range(LAYERS):
            for t in targets:
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{t}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, HIDDEN) * 0.01
                tensors[f"{prefix}.lora_B.weight"] = torch.zeros(HIDDEN, r)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    cfg: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "target_modules": list(targets),
        "bias": "none", "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "use_dora": False, "inference_mode": True,
    }
    cfg.update(config)
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return d


def patch_config(d: Path, **changes: Any) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def verify(d: Path, base: str, sha: str | None = None,
           max_rank: int = MAX_RANK) -> VerifiedArtifact:
    return verify_artifact(d, expected_sha256=sha if sha is not None else artifact_sha256(d),
                           engine_base_model=base, max_lora_rank=max_rank)


def rejected(d: Path, base: str, code: str, *, sha: str | None = None,
             max_rank: int = MAX_RANK) -> str:
    with pytest.raises(ArtifactRejected) as ei:
        verify(d, base, sha, max_rank)
    assert ei.value.code == code, ei.value.reason
    return ei.value.reason


# -- good artifacts ---------------------------------------------------------------------------

def test_good_adapter_verifies(tmp_path: Path, base_dir: Path) -> None:
    d = make_adapter(tmp_path / "a1", str(base_dir))
    (d / "lineage.json").write_text("{}")
    (d / "README.md").write_text("# adapter")
    sha = artifact_sha256(d)
    v = verify(d, str(base_dir), sha)
    assert v.sha256 == sha and len(sha) == 64
    assert v.rank == 8 and v.alpha == 16.0
    assert v.target_modules == ("q_proj", "v_proj")
    assert v.base_model == str(base_dir)
    assert v.n_tensors == LAYERS * 2 * 2
    assert v.path == d.resolve()
    assert v.bytes == (d / "adapter_model.safetensors").stat().st_size + \
        (d / "adapter_config.json").stat().st_size


def test_sha_accepts_prefix_and_upper_case(tmp_path: Path, base_dir: Path) -> None:
    d = make_adapter(tmp_path / "a", str(base_dir))
    assert verify(d, str(base_dir), "sha256:" + artifact_sha256(d).upper()).rank == 8


def test_sha_covers_config_and_weights(tmp_path: Path, base_dir: Path) -> None:
    a = make_adapter(tmp_path / "a", str(base_dir))
    before = artifact_sha256(a)
    patch_config(a, lora_alpha=64)
    assert artifact_sha256(a) != before


def test_peft_saved_adapter_verifies(tmp_path: Path, base_dir: Path) -> None:
    """An adapter saved by peft itself (tiny Llama built locally) passes unchanged."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    cfg.save_pretrained(str(base_dir))
    model = transformers.LlamaForCausalLM(cfg)
    model.name_or_path = str(base_dir)  # what peft records as base_model_name_or_path
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM")
    out = tmp_path / "peft-adapter"
    peft.get_peft_model(model, lora).save_pretrained(str(out))
    v = verify(out, str(base_dir))
    assert (v.rank, v.alpha, v.target_modules) == (4, 8.0, ("q_proj", "v_proj"))
    assert v.n_tensors == 2 * 2 * 2


def test_base_model_path_comparison(tmp_path: Path, base_dir: Path, monkeypatch) -> None:
    d = make_adapter(tmp_path / "a", str(base_dir) + "/")
    assert verify(d, str(base_dir / ".." / base_dir.name)).base_model == str(base_dir) + "/"
    # A path through a symlink names the same model.
    link = tmp_path / "base-link"
    link.symlink_to(base_dir)
    assert verify(d, str(link)).rank == 8
    # Relative paths resolve against the working directory.
    monkeypatch.chdir(tmp_path)
    assert verify(d, "./base-model").rank == 8
    assert same_base_model("org/model", "org/model")
    assert not same_base_model("org/model", "org/Model")
    assert not same_base_model("/models/org/model", "org/model")


# -- refused artifacts ------------------------------------------------------------------------

def test_wrong_sha(tmp_path: Path, base_dir: Path) -> None:
    d = make_adapter(tmp_path / "a", str(base_dir))
    actual = artifact_sha256(d)
    reason = rejected(d, str(base_dir), "sha256_mismatch", sha="ab" * 32)
    assert "sha256 mismatch" in reason and "abababababab" in reason and actual[:12] in reason


def test_config_tampered_after_hashing(tmp_path: Path, base_dir: Path) -> None:
    d = make_adapter(tmp_path / "a", str(base_dir))
    sha = artifact_sha256(d)
    patch_config(d, lora_alpha=1024)
    assert "sha256 mismatch" in rejected(d, str(base_dir), "sha256_mismatch", sha=sha)


def test_weights_tampered_after_hashing(tmp_path: Path, base_dir: Path) -> None:
    d = make_adapter(tmp_path / "a", str(base_dir))
    sha = artifact_sha256(d)
    make_adapter(d, str(base_dir))  # fresh random weights, same config
    rejected(d, str(base_dir), "sha256_mismatch", sha=sha)


def test_wrong_base(tmp_path: Path, base_dir: Path) -> None:
    other = tmp_path / "other-model"
    other.mkdir()
    d = make_adapter(tmp_path / "a", str(other))
    reason = rejected(d, str(base_dir), "wrong_base")
    assert str(other) in reason and str(base_dir) in reason
    d2 = make_adapter(tmp_path / "b", "org/model-a")
    assert "org/model-a" in rejected(d2, "org/model-b", "wrong_base")
    d3 = make_adapter(tmp_path / "c", str(base_dir), base_model_name_or_path=None)
    assert "base_model_name_or_path" in rejected(d3, str(base_dir), "wrong_base")


def test_only_pickled_bin(tmp_path: Path, base_dir: Path) -> None:
    d = tmp_path / "a"
    d.mkdir()
    torch.save({"x": torch.zeros(2)}, d / "adapter_model.bin")
    make_adapter(tmp_path / "cfg", str(base_dir))
    (d / "adapter_config.json").write_text((tmp_path / "cfg" / "adapter_config.json").read_text())
    reason = rejected(d, str(base_dir), "pickle", sha="0" * 64)
    assert "pickle files are never loaded" in reason and "adapter_model.bin" in reason


@pytest.mark.parametrize("name", ["training_args.bin", "optimizer.pt", "rng_state.pth",
                                  "state.pkl", "model.ckpt", "checkpoint-10/scheduler.PT"])
def test_pickle_beside_safetensors(tmp_path: Path, base_dir: Path, name: str) -> None:
    d = make_adapter(tmp_path / "a", str(base_dir))
    (d / name).parent.mkdir(exist_ok=True)
    (d / name).write_bytes(pickle.dumps({"lr": 1e-4}))
    reason = rejected(d, str(base_dir), "pickle")
    assert "pickle files are never loaded" in reason and name in reason


def test_rank_too_large(tmp_path: Path, base_dir: Path) -> None:
    d = make_adapter(tmp_path / "a", str(base_dir), r=32)
    reason = rejected(d, str(base_dir), "rank_too_large")
    assert "r=32" in reason and "16" in reason


def test_rank_pattern_too_large(tmp_path: Path, base_dir: Path) -> None:
    d = make_adapter(tmp_path / "a", str(base_dir), rank_pattern={"q_proj": 64})
    assert "q_proj" in rejected(d, str(base_dir), "rank_too_large")


def test_tensor_rank_above_config_rank(tmp_path: Path, base_dir: Path) -> None:
    """A config that understates the real rank is caught from the tensor shapes."""
    d = make_adapter(tmp_path / "a", str(base_dir), r=32)
    patch_config(d, r=8)
    assert "rank 32" in rejected(d, str(base_dir), "rank_too_large")


@pytest.mark.parametrize("bad,word", [(float("nan"), "NaN"), (float("inf"), "Inf"),
                                      (float("-inf"), "Inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_weights(tmp_path: Path, base_dir: Path, bad: float, word: str,
                            dtype: torch.dtype) -> None:
    d = make_adapter(tmp_path / "a", str(base_dir))
    from safetensors.torch import load_file
    tensors = {k: v.to(dtype) for k, v in load_file(str(d / "adapter_model.safetensors")).items()}
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key][3, 1] = bad
    make_adapter(d, str(base_dir), tensors=tensors)
    reason = rejected(d, str(base_dir), "non_finite")
    assert key in reason and f"1 {word}" in reason


def test_modules_to_save(tmp_path: Path, base_dir: Path) -> None:
    d = make_adapter(tmp_path / "a", str(base_dir), modules_to_save=["lm_head"])
    reason = rejected(d, str(base_dir), "modules_to_save")
    assert "modules_to_save" in reason and "lm_head" in reason


def test_symlink_escaping(tmp_path: Path, base_dir: Path) -> None:
    outside = make_adapter(tmp_path / "elsewhere", str(base_dir))
    d = make_adapter(tmp_path / "a", str(base_dir))
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    reason = rejected(d, str(base_dir), "symlink")
    assert "adapter_model.safetensors" in reason and "outside" in reason


def test_symlink_escaping_dangling_or_relative(tmp_path: Path, base_dir: Path) -> None:
    d = make_adapter(tmp_path / "a", str(base_dir))
    os.symlink("../../etc/passwd", d / "README.md")
    assert "README.md" in rejected(d, str(base_dir), "symlink")


def test_symlink_inside_is_allowed(tmp_path: Path, base_dir: Path) -> None:
    d = make_adapter(tmp_path / "a", str(base_dir))
    (d / "lineage.json").write_text("{}")
    os.symlink("lineage.json", d / "README.md")
    assert verify(d, str(base_dir)).rank == 8


def test_non_lora_keys(tmp_path: Path, base_dir: Path) -> None:
    tensors = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(HIDDEN, HIDDEN),
               "lm_head.weight": torch.zeros(128, HIDDEN)}
    d = make_adapter(tmp_path / "a", str(base_dir), tensors=tensors)
    reason = rejected(d, str(base_dir), "bad_weights")
    assert "do not look like LoRA" in reason and "lm_head.weight" in reason


def test_lora_a_without_b(tmp_path: Path, base_dir: Path) -> None:
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64)}
    d = make_adapter(tmp_path / "a", str(base_dir), tensors=tensors)
    assert "q_proj" in rejected(d, str(base_dir), "bad_weights")


def test_unreadable_safetensors_header(tmp_path: Path, base_dir: Path) -> None:
    d = make_adapter(tmp_path / "a", str(base_dir))
    (d / "adapter_model.safetensors").write_bytes(b"\xff" * 8 + b"not a header")
    assert "header is unreadable" in rejected(d, str(base_dir), "bad_weights")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_invalid_json(tmp_path: Path, base_dir: Path, text: str) -> None:
    d = make_adapter(tmp_path / "a", str(base_dir))
    (d / "adapter_config.json").write_bytes(text.encode("latin-1"))
    assert "adapter_config.json" in rejected(d, str(base_dir), "bad_config")


@pytest.mark.parametrize("override,word", [
    ({"peft_type": "PREFIX_TUNING"}, "peft_type"),
    ({"r": 0}, "r must be"),
    ({"r": "8"}, "r must be"),
    ({"lora_alpha": None}, "lora_alpha"),
    ({"target_modules": []}, "target_modules"),
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias"),
])
def test_bad_config_fields(tmp_path: Path, base_dir: Path, override: dict, word: str) -> None:
    d = make_adapter(tmp_path / "a", str(base_dir))
    patch_config(d, **override)
    assert word in rejected(d, str(base_dir), "bad_config")


@pytest.mark.parametrize("remove", ["adapter_model.safetensors", "adapter_config.json"])
def test_missing_files(tmp_path: Path, base_dir: Path, remove: str) -> None:
    d = make_adapter(tmp_path / "a", str(base_dir))
    (d / remove).unlink()
    assert remove in rejected(d, str(base_dir), "missing", sha="0" * 64)


def test_missing_dir(tmp_path: Path, base_dir: Path) -> None:
    rejected(tmp_path / "nope", str(base_dir), "missing", sha="0" * 64)


def test_unexpected_files(tmp_path: Path, base_dir: Path) -> None:
    d = make_adapter(tmp_path / "a", str(base_dir))
    (d / "tokenizer.json").write_text("{}")
    assert "tokenizer.json" in rejected(d, str(base_dir), "unexpected_file")


def test_rejection_survives_pickling() -> None:
    e = pickle.loads(pickle.dumps(ArtifactRejected("r is 64", "rank_too_large")))
    assert (e.reason, e.code) == ("r is 64", "rank_too_large")
