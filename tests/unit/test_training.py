"""workers.training on the tiny model: SFT/DPO/KTO artifacts, continuation, crash + resume, progress.

Each training is a handful of steps on 16 examples (a few seconds on 2 CPU cores).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from service.engine.artifact import PICKLE_SUFFIXES, verify_artifact
from service.models.weights import weights_sha256
from workers.training import (
    LINEAGE_FILE,
    QuantizationUnavailable,
    TrainingConfig,
    TrainingError,
    latest_checkpoint,
    train_adapter,
)

QA = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(4) for b in range(4)]
ALLOWED = {"adapter_model.safetensors", "adapter_config.json", LINEAGE_FILE}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _prompt(tok, question: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)


def _completion(tok, question: str, answer: str) -> str:
    # As workers.dataset renders it: the assistant turn up to and including eos.
    full = tok.apply_chat_template([{"role": "user", "content": question},
                                    {"role": "assistant", "content": answer}], tokenize=False)
    return full[len(_prompt(tok, question)):].rstrip()


def make_records(tok, method: str) -> list[dict]:
    """16 records in the method's format, rendered with the tiny model's chat template."""
    out = []
    for i, (q, a) in enumerate(QA):
        p, good, bad = _prompt(tok, q), _completion(tok, q, a), _completion(tok, q, "I do not know.")
        if method == "sft":
            out.append({"prompt": p, "completion": good})
        elif method == "dpo":
            out.append({"prompt": p, "chosen": good, "rejected": bad})
        else:
            out.append({"prompt": p, "completion": good if i % 2 == 0 else bad, "label": i % 2 == 0})
    return out


def _config(method: str = "sft", **kw) -> TrainingConfig:
    kw.setdefault("max_steps", 4)
    kw.setdefault("learning_rate", 1e-3)
    kw.setdefault("checkpoint_every_steps", 100)
    kw.setdefault("per_device_batch_size", 4)
    kw.setdefault("dpo_sft_weight", 0.0)  # plain DPO unless a test asks for the SFT term
    return TrainingConfig(method=method, **kw)


def _lora_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _assert_valid_artifact(result, base: Path) -> None:
    art = result.artifact_dir
    names = {p.relative_to(art).as_posix() for p in art.rglob("*")}
    assert names <= ALLOWED and {"adapter_model.safetensors", "adapter_config.json"} <= names
    assert not [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    verified = verify_artifact(art, expected_sha256=result.sha256, engine_base_model=str(base),
                               max_lora_rank=16)
    assert verified.rank == 8
    cfg = json.loads((art / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base)
    assert not cfg.get("modules_to_save")


@pytest.mark.parametrize("method", ["sft", "dpo", "kto"])
def test_method_trains_a_valid_artifact(method, tiny_model, tokenizer, tmp_path):
    base_sha = weights_sha256(tiny_model)
    result = train_adapter(base_model_dir=tiny_model, data={"train": make_records(tokenizer, method)},
                           config=_config(method), out_dir=tmp_path / "art", work_dir=tmp_path / "work",
                           lineage={"version": "v1", "dataset_sha256": "abc"})
    _assert_valid_artifact(result, tiny_model)
    # LoRA B starts at zero: non-zero B means the adapter actually learned something.
    tensors = _lora_tensors(result.artifact_dir)
    b = [t for k, t in tensors.items() if "lora_B" in k]
    assert b and all(float(t.abs().sum()) > 0 for t in b)
    assert weights_sha256(tiny_model) == base_sha  # the base is frozen and never written
    assert result.metrics["steps"] == 4 and math.isfinite(result.metrics["train_loss"])
    assert result.metrics["tokens"] > 0 and result.metrics["tokens_per_s"] > 0
    import torch

    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert result.resumed_from_step is None and result.precision == ("bf16" if cuda_bf16 else "fp32")
    assert {"torch", "transformers", "peft", "trl", "accelerate"} <= set(result.library_versions)
    lineage = json.loads((result.artifact_dir / LINEAGE_FILE).read_text())
    assert lineage["version"] == "v1" and lineage["dataset_sha256"] == "abc"
    assert lineage["training"]["method"] == method
    assert lineage["training"]["library_versions"]["trl"] == result.library_versions["trl"]


def test_continuing_starts_from_the_parent_weights(tiny_model, tokenizer, tmp_path):
    from transformers import TrainerCallback

    records = make_records(tokenizer, "sft")
    parent = train_adapter(base_model_dir=tiny_model, data={"train": records}, config=_config(),
                           out_dir=tmp_path / "v1", work_dir=tmp_path / "work1")

    class Snapshot(TrainerCallback):
        initial: dict | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from peft import get_peft_model_state_dict

            self.initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}

    snap = Snapshot()
    child = train_adapter(base_model_dir=tiny_model, data={"train": records},
                          config=_config(lora_r=4, seed=1), out_dir=tmp_path / "v2",
                          work_dir=tmp_path / "work2", parent_adapter_dir=parent.artifact_dir,
                          callbacks=[snap])
    _assert_valid_artifact(child, tiny_model)
    parent_w, child_w = _lora_tensors(parent.artifact_dir), _lora_tensors(child.artifact_dir)
    assert snap.initial is not None and set(snap.initial) == set(parent_w) == set(child_w)
    assert all(snap.initial[k].equal(parent_w[k]) for k in parent_w)
    assert any(not child_w[k].equal(parent_w[k]) for k in parent_w)
    assert child.lora["r"] == 8  # the parent's shape wins over the config's lora_r
    lineage = json.loads((child.artifact_dir / LINEAGE_FILE).read_text())
    assert lineage["training"]["parent_adapter"]["sha256"] == parent.sha256


def test_parent_on_another_base_is_refused(tiny_model, tokenizer, tmp_path):
    from service.engine.artifact import artifact_sha256

    art = tmp_path / "foreign"
    art.mkdir()
    (art / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
        "base_model_name_or_path": "/somewhere/else"}))
    (art / "adapter_model.safetensors").write_bytes(b"")
    assert artifact_sha256(art)
    with pytest.raises(TrainingError, match="parent adapter"):
        train_adapter(base_model_dir=tiny_model, data={"train": make_records(tokenizer, "sft")},
                      config=_config(), out_dir=tmp_path / "art", work_dir=tmp_path / "work",
                      parent_adapter_dir=art)


def test_resume_after_a_crash(tiny_model, tokenizer, tmp_path):
    from transformers import TrainerCallback

    class CrashAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:  # checkpoint-4 is on disk: die like a kill -9 would
                raise RuntimeError("simulated worker crash")

    records = make_records(tokenizer, "sft")
    kw = dict(base_model_dir=tiny_model, data={"train": records},
              config=_config(max_steps=6, checkpoint_every_steps=2),
              out_dir=tmp_path / "out" / "v1", work_dir=tmp_path / "work")
    with pytest.raises(RuntimeError, match="simulated worker crash"):
        train_adapter(**kw, callbacks=[CrashAfterSave()])
    assert not (tmp_path / "out" / "v1").exists()
    assert latest_checkpoint(tmp_path / "work" / "checkpoints").name == "checkpoint-4"

    steps: list[int] = []
    result = train_adapter(**kw, progress=lambda e: steps.append(e["step"]))
    assert result.resumed_from_step == 4
    assert result.metrics["steps"] == 6 and steps == [5, 6]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["v1"]  # one artifact, no temp dirs
    _assert_valid_artifact(result, tiny_model)


def test_checkpoints_of_another_run_are_not_resumed(tiny_model, tokenizer, tmp_path):
    records = make_records(tokenizer, "sft")
    kw = dict(base_model_dir=tiny_model, work_dir=tmp_path / "work")
    first = train_adapter(**kw, data={"train": records}, out_dir=tmp_path / "a1",
                          config=_config(max_steps=2, checkpoint_every_steps=1))
    assert first.resumed_from_step is None
    # Same work dir, other data: its checkpoints must not seed this run.
    other = train_adapter(**kw, data={"train": records[:8]}, out_dir=tmp_path / "a2",
                          config=_config(max_steps=2, checkpoint_every_steps=1))
    assert other.resumed_from_step is None and other.metrics["steps"] == 2
    # A retry of that same run (e.g. redelivered after the artifact was written) resumes at its end.
    retry = train_adapter(**kw, data={"train": records[:8]}, out_dir=tmp_path / "a3",
                          config=_config(max_steps=2, checkpoint_every_steps=1))
    assert retry.resumed_from_step == 2
    assert retry.sha256 == other.sha256  # same weights and config: the same artifact


def test_progress_reports_steps_loss_and_eta(tiny_model, tokenizer, tmp_path):
    events: list[dict] = []
    train_adapter(base_model_dir=tiny_model, data={"train": make_records(tokenizer, "sft")},
                  config=_config(max_steps=5), out_dir=tmp_path / "art", work_dir=tmp_path / "work",
                  progress=events.append)
    assert [e["step"] for e in events] == [1, 2, 3, 4, 5]
    for e in events:
        assert {"step", "total_steps", "loss", "tokens_per_s", "eta_s", "epoch"} <= set(e)
        assert e["total_steps"] == 5 and math.isfinite(e["loss"]) and e["tokens_per_s"] > 0
        assert e["eta_s"] is not None and e["eta_s"] >= 0
    assert events[-1]["eta_s"] == 0
    assert [e["epoch"] for e in events] == sorted(e["epoch"] for e in events)


def test_eval_records_are_evaluated(tiny_model, tokenizer, tmp_path):
    records = make_records(tokenizer, "sft")
    result = train_adapter(base_model_dir=tiny_model, data={"train": records[:12], "eval": records[12:]},
                           config=_config(max_steps=2), out_dir=tmp_path / "art",
                           work_dir=tmp_path / "work")
    assert math.isfinite(result.metrics["eval_loss"])


def test_qlora_without_cuda_fails_before_loading_anything(tiny_model, tokenizer, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: QLoRA would really run")
    with pytest.raises(QuantizationUnavailable, match="CUDA is not available") as info:
        train_adapter(base_model_dir=tiny_model, data={"train": make_records(tokenizer, "sft")},
                      config=_config(max_steps=1, quantization="qlora"), out_dir=tmp_path / "art",
                      work_dir=tmp_path / "work")
    assert "quantization_fallback: lora" in str(info.value)
    assert not (tmp_path / "art").exists() and not (tmp_path / "work").exists()


def test_qlora_without_cuda_trains_lora_when_the_fallback_is_allowed(tiny_model, tokenizer, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: QLoRA would really run")
    result = train_adapter(base_model_dir=tiny_model, data={"train": make_records(tokenizer, "sft")},
                           config=_config(max_steps=1, quantization="qlora",
                                          quantization_fallback="lora"),
                           out_dir=tmp_path / "art", work_dir=tmp_path / "work")
    assert result.quantization == "none" and "CUDA" in result.quantization_reason
    assert "trained plain LoRA" in result.quantization_reason
    lineage = json.loads((result.artifact_dir / LINEAGE_FILE).read_text())
    assert "CUDA" in lineage["training"]["quantization_reason"]
    assert lineage["training"]["config"]["quantization_fallback"] == "lora"


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_training_tokenizes_like_the_engine(method, tiny_model, tokenizer):
    """One bos, as vLLM tokenizes a rendered chat (TRL's plain-text path would add a second)."""
    from workers.training import _to_dataset

    records = make_records(tokenizer, method)[:2]
    ds = _to_dataset(method, records, tokenizer, max_length=1024)
    for rec, row in zip(records, ds, strict=True):
        engine_ids = tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"]
        assert engine_ids.count(tokenizer.bos_token_id) == 1
        if method == "sft":
            ids, labels = row["input_ids"], row["labels"]
            assert ids[:len(engine_ids)] == engine_ids and ids[-1] == tokenizer.eos_token_id
            assert labels[:len(engine_ids)] == [-100] * len(engine_ids)  # loss on the answer only
            assert labels[len(engine_ids):] == ids[len(engine_ids):]
        else:  # TRL tokenizes these itself, with add_special_tokens=True
            assert tokenizer(row["prompt"])["input_ids"] == engine_ids


@pytest.mark.parametrize("method", ["sft", "dpo", "kto"])
def test_dataset_records_train_on_the_engines_ids(method, tiny_model, tokenizer):
    """workers.dataset leaves the template's bos to the trainer's tokenizer; every method's ids
    must still be the engine's, with one bos."""
    from datetime import UTC, datetime

    from workers.dataset import DatasetConfig, RatedInteraction, build_dataset
    from workers.redaction import NullRedactor
    from workers.training import _to_dataset

    items = [RatedInteraction(interaction_id=f"00000000-0000-4000-8000-{i:012d}",
                              messages=[{"role": "user", "content": q}], response_text="I do not know.",
                              rating="down", correction=a, rater_id="", created_at=datetime(2026, 1, 1, tzinfo=UTC))
             for i, (q, a) in enumerate(QA[:2])]
    built = build_dataset(items, tokenizer=tokenizer, redactor=NullRedactor(), policy=DatasetConfig(
        method=method, heldout_fraction=0.0, replay_fraction=0.0, min_examples=1))
    records = built.train[method]
    rows = list(_to_dataset(method, records, tokenizer, max_length=1024))
    assert len(rows) == len(records) >= 2
    for n, row in enumerate(rows):
        q, a = QA[n] if method != "kto" else QA[n // 2]  # kto: the answer, then the correction
        engine_prompt = tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                      add_generation_prompt=True, return_dict=False)
        assert engine_prompt.count(tokenizer.bos_token_id) == 1
        if method == "sft":
            engine_ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": q}, {"role": "assistant", "content": a}], return_dict=False)
            assert row["input_ids"] == engine_ids[:len(row["input_ids"])]
            assert row["labels"][:len(engine_prompt)] == [-100] * len(engine_prompt)
        else:  # TRL tokenizes these itself, with add_special_tokens=True
            assert tokenizer(row["prompt"])["input_ids"] == engine_prompt


def test_sft_rows_respect_max_length(tiny_model, tokenizer):
    from workers.training import _to_dataset

    records = make_records(tokenizer, "sft")
    n_prompt = len(tokenizer(records[0]["prompt"], add_special_tokens=False)["input_ids"])
    ds = _to_dataset("sft", records, tokenizer, max_length=n_prompt + 2)
    assert all(len(r["input_ids"]) <= n_prompt + 2 for r in ds)
    with pytest.raises(TrainingError, match="fills max_length"):
        _to_dataset("sft", records, tokenizer, max_length=3)


def test_padding_free_batches_compute_the_padded_loss(tiny_model, tokenizer, tmp_path):
    """Flattened batches must not let attention cross examples (sdpa gets a block mask)."""
    losses = {}
    for name, kw in {"padded": {}, "padding_free": {"padding_free": True}}.items():
        result = train_adapter(base_model_dir=tiny_model, data={"train": make_records(tokenizer, "sft")},
                               config=_config(max_steps=1, **kw), out_dir=tmp_path / name / "art",
                               work_dir=tmp_path / name / "work")
        _assert_valid_artifact(result, tiny_model)
        losses[name] = result.metrics["final_loss"]  # step 1: before any update, same batch
    assert losses["padding_free"] == pytest.approx(losses["padded"], rel=1e-5)


def test_plain_and_fused_sft_losses_agree(tiny_model, tokenizer, tmp_path):
    """TRL's fused LM-head loss (default on GPU) and the model's own loss (default on CPU)."""
    losses = {}
    for fused in (True, False):
        result = train_adapter(base_model_dir=tiny_model, data={"train": make_records(tokenizer, "sft")},
                               config=_config(max_steps=1, fused_loss=fused),
                               out_dir=tmp_path / str(fused) / "art", work_dir=tmp_path / str(fused) / "work")
        losses[fused] = result.metrics["final_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_sft_packing_trains(tiny_model, tokenizer, tmp_path):
    result = train_adapter(base_model_dir=tiny_model, data={"train": make_records(tokenizer, "sft")},
                           config=_config(max_steps=2, packing=True, max_length=64),
                           out_dir=tmp_path / "art", work_dir=tmp_path / "work")
    _assert_valid_artifact(result, tiny_model)
    assert math.isfinite(result.metrics["train_loss"]) and result.metrics["tokens"] > 0


def test_existing_artifact_is_never_overwritten(tiny_model, tokenizer, tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    with pytest.raises(TrainingError, match="already exists"):
        train_adapter(base_model_dir=tiny_model, data={"train": make_records(tokenizer, "sft")},
                      config=_config(), out_dir=out, work_dir=tmp_path / "work")


@pytest.mark.parametrize("method,drop", [("sft", "completion"), ("dpo", "rejected"), ("kto", "label")])
def test_malformed_records_are_refused(method, drop, tiny_model, tokenizer, tmp_path):
    records = make_records(tokenizer, method)
    del records[3][drop]
    with pytest.raises(TrainingError, match=f"record 3 lacks {drop}"):
        train_adapter(base_model_dir=tiny_model, data={"train": records}, config=_config(method),
                      out_dir=tmp_path / "art", work_dir=tmp_path / "work")


def test_config_validation_and_round_trip():
    cfg = TrainingConfig(method="kto", target_modules=["q_proj", "k_proj"], max_steps=3)
    assert TrainingConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.resolved_learning_rate == 5e-5
    with pytest.raises(ValueError, match="unknown"):
        TrainingConfig.from_dict({"lora_rank": 8})
    with pytest.raises(ValueError):
        TrainingConfig(method="ppo")
    with pytest.raises(ValueError, match="KTO"):
        TrainingConfig(method="kto", per_device_batch_size=1)
    with pytest.raises(ValueError):
        TrainingConfig(quantization="int8")
    with pytest.raises(ValueError, match="quantization_fallback"):
        TrainingConfig(quantization="qlora", quantization_fallback="int8")


def _mean_logp(base: Path, adapter: Path, tok, pairs: list[tuple[str, str]]) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    total = 0.0
    for prompt, completion in pairs:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        total += float(logp[len(p) - 1:].gather(1, ids[0, len(p):, None]).sum()) / len(c)
    return total / len(pairs)


def test_dpo_sft_term_keeps_the_chosen_answers_likely(tiny_model, tokenizer, tmp_path):
    """Plain DPO may push both answers down and still win on preference; the SFT term (RPO)
    anchors the chosen answer, so it ends up more likely than under plain DPO."""
    records = make_records(tokenizer, "dpo")
    results = {}
    for weight in (0.0, 1.0):
        results[weight] = train_adapter(
            base_model_dir=tiny_model, data={"train": records},
            config=_config("dpo", max_steps=12, dpo_sft_weight=weight, warmup_steps=2,
                           lr_scheduler_type="cosine"),
            out_dir=tmp_path / f"w{weight}", work_dir=tmp_path / f"work{weight}")
    chosen = [(r["prompt"], r["chosen"]) for r in records]
    plain = _mean_logp(tiny_model, results[0.0].artifact_dir, tokenizer, chosen)
    anchored = _mean_logp(tiny_model, results[1.0].artifact_dir, tokenizer, chosen)
    assert anchored > plain + 0.05, (plain, anchored)


def test_policy_training_knobs_reach_the_trainer_config(tmp_path):
    from service.domain.policy import Policy
    from workers.recipe import training_config
    from workers.training import _trainer_args

    policy = Policy.model_validate({"training": {"dpo_sft_weight": 0.5, "lr_scheduler": "cosine",
                                                 "warmup_steps": 3}})
    config = training_config(policy, "dpo")
    args = _trainer_args(config, tmp_path, "fp32")
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.5]
    assert args.lr_scheduler_type == "cosine" and args.warmup_steps == 3
    plain = _trainer_args(training_config(Policy.model_validate(
        {"training": {"dpo_sft_weight": 0}}), "dpo"), tmp_path, "fp32")
    assert plain.loss_type == ["sigmoid"]
