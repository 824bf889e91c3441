"""The locally built tiny model: loads in transformers, chat template, determinism, caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.local.tiny_model import CHAT_TEMPLATE, MARKER_FILE, build_tiny_model
from service.models.weights import weights_sha256
from tests.helpers.stack import TINY_MODEL_CACHE

MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is the weather in Paris?"},
]


@pytest.fixture(scope="module")
def cached_model() -> Path:
    return build_tiny_model(TINY_MODEL_CACHE, seed=0)


def test_loads_in_transformers(cached_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cached_model)
    model = AutoModelForCausalLM.from_pretrained(cached_model)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (256, 4, 2, 2)
    assert cfg.hidden_size // cfg.num_attention_heads == 64  # vLLM CPU refuses smaller head dims
    assert cfg.tie_word_embeddings is False
    assert len(tok) <= cfg.vocab_size
    assert tok.eos_token_id == cfg.eos_token_id == model.generation_config.eos_token_id
    ids = torch.tensor([tok("The sky is blue.")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], cfg.vocab_size)


def test_chat_template(cached_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cached_model)
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<s><|system|>\nYou are helpful.</s>\n<|user|>\nWhat is the weather in Paris?</s>\n<|assistant|>\n"
    )
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # Role markers are single special tokens, hidden from decoded output.
    assert tok.convert_tokens_to_ids("<|assistant|>") in ids
    assert tok.decode(ids, skip_special_tokens=True).strip().startswith("You are helpful.")
    no_prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=False, tokenize=False)
    assert not no_prompt.endswith("<|assistant|>\n")
    with pytest.raises(Exception, match="Unsupported role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_files_vllm_reads(cached_model):
    tok_cfg = json.loads((cached_model / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == CHAT_TEMPLATE
    assert (cached_model / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    # vLLM stops on generation_config's eos; it must be the tokenizer's </s>.
    added = json.loads((cached_model / "tokenizer.json").read_text())["added_tokens"]
    eos_id = next(t["id"] for t in added if t["content"] == "</s>")
    gen = json.loads((cached_model / "generation_config.json").read_text())
    assert gen["eos_token_id"] == eos_id
    assert list(cached_model.glob("*.safetensors")) and not list(cached_model.glob("*.bin"))


def test_any_text_round_trips(cached_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cached_model)
    text = "Zebra ünïcode 😀 {json: [1, 2]}\n\ttabs"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_deterministic_per_seed(cached_model, tmp_path):
    same = build_tiny_model(tmp_path / "s0", seed=0)
    other = build_tiny_model(tmp_path / "s1", seed=1)
    assert weights_sha256(same) == weights_sha256(cached_model)
    assert weights_sha256(other) != weights_sha256(cached_model)
    # The tokenizer does not depend on the weight seed.
    assert (same / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_cached_build_is_reused(tmp_path):
    out = build_tiny_model(tmp_path / "m", seed=3)
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker == {"seed": 3, "pretrain_steps": 0, "builder_version": 1}
    weights = out / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_model(tmp_path / "m", seed=3) == out
    assert weights.stat().st_mtime_ns == before
    # A different request replaces the build.
    build_tiny_model(tmp_path / "m", seed=4)
    assert json.loads((out / MARKER_FILE).read_text())["seed"] == 4
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_refuses_to_replace_foreign_dir(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_model(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_pretraining_is_deterministic_and_changes_weights(cached_model, tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=0, pretrain_steps=3)
    b = build_tiny_model(tmp_path / "b", seed=0, pretrain_steps=3)
    assert weights_sha256(a) == weights_sha256(b) != weights_sha256(cached_model)
