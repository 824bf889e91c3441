"""The policies the benchmark's product runs under, per base model, and the oracle's override.

Picked on dev splits, never on test. SmolLM2's training is the demo's (service/local/demo.py: SFT on
the corrections, 10 epochs at 3e-4, LoRA r=16 on every linear projection; picked on the support
desk's dev split, used unchanged for the other tasks) with automatic approval, so that the gate
is the only judge, and a trigger at each round's ratings. Its golden suite is the shipped
default's generic one (policies/default.yaml: small talk still answered, no template markup, no
loops), not the demo's "capital of France": a task whose users want every answer in their house
rules rightly trains that case away (BENCHMARKS.md §1, the support desk's first run). The tiny
model's continues the serving adapter for 150 steps at 1e-3 on every linear projection, picked
among four on the house-style task's dev split (BENCHMARKS.md §1); it has no golden case, since
the tiny model knows no facts.
"""

from __future__ import annotations

import yaml

# The loop's policy: one shape, each base model's recipe filled in from RECIPES.
LOOP = """# Written by bench.learning ({model}).
trigger: {{min_new_ratings: {per_round}}}
training:
  method: sft
  start_from: {start_from}
  learning_rate: {learning_rate}
  {length}
  batch_size: 8
  checkpoint_every_steps: {checkpoint_every_steps}
  lora: {{r: {r}, alpha: {alpha}, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}
dataset: {{heldout_fraction: 0.2, replay_fraction: {replay_fraction}, min_examples: {min_examples}}}
gate:
  min_preference_accuracy: {min_preference_accuracy}
  max_nll_regression: 0.05
{golden}approval: auto
watch: {{window_minutes: 30, min_samples: 20, max_drop: 0.2, alpha: 0.05}}
"""

# The shipped default's generic golden suite (the module docstring says why not the demo's).
GENERIC_GOLDEN = """  golden:
    - {prompt: "Hello! How are you today?", non_empty: true, no_template_tokens: true, max_repetition: 0.5, max_tokens: 48}
    - {prompt: "Thanks, that was helpful.", non_empty: true, no_template_tokens: true, max_repetition: 0.5, max_tokens: 48}
"""

RECIPES = {
    "smollm2": {"model": "SmolLM2-135M-Instruct", "start_from": "base", "learning_rate": "3.0e-4",
                "length": "epochs: 10", "checkpoint_every_steps": 10, "r": 16, "alpha": 32,
                "replay_fraction": 0.5, "min_examples": 8, "min_preference_accuracy": 0.6,
                "golden": GENERIC_GOLDEN},
    "tiny": {"model": "the tiny test model", "start_from": "serving", "learning_rate": "1.0e-3",
             "length": "max_steps: 150", "checkpoint_every_steps": 50, "r": 8, "alpha": 16,
             "replay_fraction": 0.2, "min_examples": 4, "min_preference_accuracy": 0.5,
             "golden": ""},
}

# The oracle is a ceiling, not a product: trained once from the base on the wanted answers to
# every train prompt of the seed, with the same recipe, and served whatever the gate would say.
# A recipe with a fixed step count gets the steps of all rounds together (epochs scale by
# themselves with the larger dataset).
ORACLE = """# Written by bench.learning: the oracle alias (a ceiling; no gate).
trigger: {{min_new_ratings: {n}}}
training: {{start_from: base{steps}}}
gate: {{min_preference_accuracy: 0.0, max_nll_regression: 1000, max_nll_regression_abs: 1000, golden: []}}
approval: auto
"""


def for_model(model: str, per_round: int) -> str:
    """The default policy text for `model` ("tiny" or anything else: SmolLM2's)."""
    return LOOP.format(per_round=per_round, **RECIPES["tiny" if model == "tiny" else "smollm2"])


def oracle(n: int, rounds: int, loop_policy: str) -> str:
    """The oracle alias's policy over `loop_policy`: n ratings trigger it, and a fixed step
    budget is multiplied by the rounds the loop trains."""
    steps = ((yaml.safe_load(loop_policy) or {}).get("training") or {}).get("max_steps")
    return ORACLE.format(n=n, steps=f", max_steps: {int(steps) * rounds}" if steps else "")
