"""The eval gate on real trained adapters: a better candidate passes, one trained on flipped
labels is rejected with its reasons."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from service.domain.policy import GatePolicy
from workers.dataset import render_completion, render_prompt
from workers.gate import decide
from workers.stages.evaluate import offline_metrics
from workers.training import TrainingConfig, train_adapter

PRODUCTS = ["order", "account", "invoice", "delivery", "subscription", "password"]
ISSUES = ["is late", "is missing", "was cancelled", "is locked"]


def good(p, i):
    return f"I am sorry that your {p} {i}. We will send you a new {p} today."


def bad(p, i):
    return f"Your {p} is not our problem."


@pytest.fixture(scope="module")
def data(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    combos = [(p, i) for p in PRODUCTS for i in ISSUES]
    train_combos, held_combos = combos[::2] + combos[1::4], combos[3::4]

    def sft(answer_fn, pairs):
        out = []
        for p, i in pairs:
            msgs = [{"role": "user", "content": f"My {p} {i}."}]
            prompt = render_prompt(msgs, tok)
            out.append({"prompt": prompt, "completion": render_completion(msgs, answer_fn(p, i), tok,
                                                                          prompt=prompt)})
        return out

    heldout = []
    for p, i in held_combos:
        msgs = [{"role": "user", "content": f"My {p} {i}."}]
        prompt = render_prompt(msgs, tok)
        heldout.append({"messages": msgs, "prompt": prompt, "rating": "up", "response": good(p, i),
                        "correction": None})
        heldout.append({"messages": msgs, "prompt": prompt, "rating": "down", "response": bad(p, i),
                        "correction": good(p, i)})
    return {"better": sft(good, train_combos), "flipped": sft(bad, train_combos), "heldout": heldout}


def _train(tiny_model, records, out):
    config = TrainingConfig(method="sft", max_steps=24, per_device_batch_size=4, learning_rate=1e-3,
                            checkpoint_every_steps=100, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    return train_adapter(base_model_dir=str(tiny_model), data={"train": records}, config=config,
                         out_dir=out / "adapter", work_dir=out / "work")


@pytest.mark.slow
def test_gate_passes_a_better_candidate_and_rejects_flipped_labels(tiny_model, data, tmp_path):
    gate = GatePolicy(min_preference_accuracy=0.6, max_nll_regression=0.05)
    better = _train(tiny_model, data["better"], tmp_path / "better")
    flipped = _train(tiny_model, data["flipped"], tmp_path / "flipped")

    m_better = offline_metrics(str(tiny_model), str(better.artifact_dir), None, data["heldout"])
    verdict = decide(gate, m_better, None)
    assert verdict.passed, verdict.reasons
    assert m_better["preference_accuracy"] >= 0.8 and m_better["nll_candidate"] < m_better["nll_reference"]

    m_flipped = offline_metrics(str(tiny_model), str(flipped.artifact_dir), None, data["heldout"])
    verdict = decide(gate, m_flipped, None)
    assert not verdict.passed
    assert m_flipped["preference_accuracy"] < 0.6
    assert any(r.startswith(f"preference accuracy {m_flipped['preference_accuracy']:.2f}")
               for r in verdict.reasons), verdict.reasons
    assert m_flipped["reward_margin"] < 0 < m_better["reward_margin"]

    # Against the better version as the serving reference, the flipped one is still refused.
    m_vs = offline_metrics(str(tiny_model), str(flipped.artifact_dir), str(better.artifact_dir),
                           data["heldout"])
    assert m_vs["reference"] == "the serving version"
    assert not decide(gate, m_vs, None).passed
