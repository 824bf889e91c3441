"""The real default model, SmolLM2-135M-Instruct: prepared from pip, served by vLLM, trained by the
worker's trainer, and judged by the eval gate with its default thresholds.

The proofs of quality run here, on a real chat model, not on the tiny test model: the dataset
renders prompts token for token as vLLM does, PEFT and vLLM produce the same greedy answer with
the same adapter, and the gate passes an adapter trained on the answers users wanted and rejects
one trained on the answers they rejected.
"""

from __future__ import annotations

import random

import httpx
import pytest
from transformers import AutoTokenizer

from service.domain.policy import GatePolicy, GoldenCase
from service.models.inspect import inspect_model_dir
from service.models.prepare import DEFAULT_MODEL, weights_sha256
from service.tasks import support_desk
from workers.dataset import render_completion, render_prompt
from workers.gate import check_golden_output, decide
from workers.stages.evaluate import offline_metrics
from workers.training import TrainingConfig, train_adapter

# Training two adapters on a real model takes minutes on 2 cores (the module's first test pays).
pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1800)]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Où est ma commande ? 🚚 Ça fait 3 jours."}],
]
GOLDEN = GoldenCase(prompt="What is the capital of France?", must_contain=["Paris"], max_tokens=48)


def _generic(messages: list[dict], rng: random.Random) -> str:
    """An answer that breaks the support desk's rules (what its users thumb down)."""
    product, _ = support_desk.topic(messages)
    return rng.choice([f"I'm sorry to hear about your {product}. Please contact the store "
                       "where you bought it.",
                       f"Please try again later. If your {product} still has problems, "
                       "restart your device."])


def test_the_default_model_is_prepared_from_pip_with_its_provenance(smollm2):
    info = inspect_model_dir(smollm2)
    assert info.architecture == "LlamaForCausalLM" and info.max_positions == 8192
    source = info.provenance["source"]
    assert (source["package"], source["version"]) == (DEFAULT_MODEL.package, DEFAULT_MODEL.version)
    assert source["file_sha256"] == DEFAULT_MODEL.sha256
    assert info.provenance["weights_sha256"] == weights_sha256(smollm2)
    assert (smollm2 / "chat_template.jinja").is_file() and (smollm2 / "tokenizer.json").is_file()


def test_vllm_serves_it_with_its_context_and_it_answers(smollm2_vllm):
    cards = httpx.get(f"{smollm2_vllm.url}/v1/models", timeout=30).json()["data"]
    assert cards[0]["max_model_len"] == 1024
    r = httpx.post(f"{smollm2_vllm.url}/v1/chat/completions", timeout=120, json={
        "model": "base", "messages": CONVERSATIONS[0], "max_tokens": 16, "temperature": 0})
    assert "Paris" in r.json()["choices"][0]["message"]["content"]


def test_the_dataset_renders_prompts_exactly_as_vllm_tokenizes_them(smollm2, smollm2_vllm):
    tok = AutoTokenizer.from_pretrained(smollm2)
    for messages in CONVERSATIONS:
        prompt = render_prompt(messages, tok)
        ours = tok(prompt, add_special_tokens=False)["input_ids"]
        theirs = httpx.post(f"{smollm2_vllm.url}/tokenize", timeout=30, json={
            "model": "base", "messages": messages, "add_generation_prompt": True}).json()
        assert ours == theirs["tokens"], messages
        # The training record (prompt + completion) starts with exactly those tokens.
        completion = render_completion(messages, "Bien sûr !", tok, prompt=prompt)
        full = tok(prompt + completion, add_special_tokens=False)["input_ids"]
        assert full[:len(ours)] == ours and full[-1] == tok.eos_token_id


@pytest.fixture(scope="module")
def adapters(smollm2, tmp_path_factory):
    """Two adapters on SmolLM2 trained by the worker's trainer: one on the answers users wanted
    (support desk rules), one on the answers they thumbed down (as inverted ratings would)."""
    tok = AutoTokenizer.from_pretrained(smollm2)
    rng = random.Random(3)
    train = support_desk.prompts("train", 24, rng)

    def records(answer) -> list[dict]:
        out = []
        for messages in train:
            prompt = render_prompt(messages, tok)
            out.append({"prompt": prompt,
                        "completion": render_completion(messages, answer(messages), tok,
                                                        prompt=prompt)})
        return out

    config = TrainingConfig(method="sft", max_steps=16, per_device_batch_size=8,
                            learning_rate=5e-4, lora_r=16, lora_alpha=32,
                            target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                            "up_proj", "down_proj"),
                            checkpoint_every_steps=100, max_length=1024)
    root = tmp_path_factory.mktemp("smollm2-adapters")
    out = {}
    for name, answer in (("wanted", support_desk.WANTED),
                         ("inverted", lambda m: _generic(m, rng))):
        result = train_adapter(base_model_dir=str(smollm2), data={"train": records(answer)},
                               config=config, out_dir=root / name, work_dir=root / f"{name}-work")
        assert result.metrics["steps"] == 16
        out[name] = result.artifact_dir
    return out


@pytest.fixture(scope="module")
def heldout(smollm2) -> list[dict]:
    """Held-out interactions as the dataset step writes them: test-split questions (products and
    phrasings never trained on), answered against the rules and corrected, or answered well."""
    tok = AutoTokenizer.from_pretrained(smollm2)
    rng = random.Random(11)
    out = []
    for k, messages in enumerate(support_desk.prompts("test", 12, rng)):
        prompt = render_prompt(messages, tok)
        if k % 3 == 2:
            out.append({"messages": messages, "prompt": prompt, "rating": "up",
                        "response": support_desk.WANTED(messages), "correction": None})
        else:
            out.append({"messages": messages, "prompt": prompt, "rating": "down",
                        "response": _generic(messages, rng),
                        "correction": support_desk.WANTED(messages)})
    return out


def _vllm_chat(url: str, model: str, messages: list[dict], max_tokens: int) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def loaded(smollm2_vllm, adapters) -> dict[str, str]:
    """Both adapters loaded into the running engine at runtime, under fresh names."""
    names = {}
    for name, path in adapters.items():
        lora = f"smollm2-{name}-{random.randrange(10**6)}"
        r = httpx.post(f"{smollm2_vllm.url}/v1/load_lora_adapter", timeout=120,
                       json={"lora_name": lora, "lora_path": str(path)})
        assert r.status_code == 200, r.text
        names[name] = lora
    return names


def test_train_serve_parity_peft_and_vllm_answer_alike(smollm2, smollm2_vllm, adapters, loaded):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32), str(adapters["wanted"]))
    model.eval()
    questions = support_desk.prompts("test", 3, random.Random(5)) + [CONVERSATIONS[0]]
    followed = 0
    for messages in questions:
        ids = tok(render_prompt(messages, tok), add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=40, do_sample=False)
        peft_text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        served = _vllm_chat(smollm2_vllm.url, loaded["wanted"], messages, 40)
        assert served == peft_text.strip() or served == peft_text, (messages, served, peft_text)
        followed += served.startswith(support_desk.OPENING)
    # The adapter changed the answers (parity of a no-op adapter would prove nothing).
    base = _vllm_chat(smollm2_vllm.url, "base", questions[0], 40)
    assert followed >= 2 and not base.startswith(support_desk.OPENING), (followed, base)


def test_the_gate_defaults_pass_the_wanted_adapter_and_reject_the_inverted_one(
        smollm2, smollm2_vllm, adapters, loaded, heldout):
    gate = GatePolicy(golden=[GOLDEN])
    verdicts = {}
    for name, path in adapters.items():
        metrics = offline_metrics(str(smollm2), str(path), None, heldout)
        output = _vllm_chat(smollm2_vllm.url, loaded[name],
                            [{"role": "user", "content": GOLDEN.prompt}], GOLDEN.max_tokens)
        golden = [{"prompt": GOLDEN.prompt, "output": output,
                   "failures": check_golden_output(GOLDEN, output)}]
        golden[0]["passed"] = not golden[0]["failures"]
        verdicts[name] = (decide(gate, metrics, golden), metrics)
    wanted, wanted_metrics = verdicts["wanted"]
    inverted, inverted_metrics = verdicts["inverted"]
    assert wanted.passed, (wanted.reasons, wanted_metrics)
    assert wanted_metrics["preference_accuracy"] >= 0.9
    assert wanted_metrics["nll_candidate"] < wanted_metrics["nll_reference"]
    assert not inverted.passed
    assert any("preference" in r for r in inverted.reasons), inverted.reasons
    assert inverted_metrics["preference_accuracy"] < gate.min_preference_accuracy
