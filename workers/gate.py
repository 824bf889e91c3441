"""The gate's decision as a pure function: metrics in, a verdict with a reason per failure out."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from service.domain.policy import GatePolicy


@dataclass
class Verdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # one sentence per failed criterion
    notes: list[str] = field(default_factory=list)  # what was not measured, and why

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": self.reasons, "notes": self.notes}


def decide(gate: GatePolicy, metrics: dict[str, Any], golden: list[dict] | None) -> Verdict:
    """Apply the policy's thresholds. metrics: preference_accuracy, n_preference, nll_candidate,
    nll_reference, n_nll, answer_wins, answer_losses, answer_win_rate, n_answers, reference
    (what the candidate was compared with)."""
    reasons: list[str] = []
    notes: list[str] = []
    ref = metrics.get("reference", "the serving version")
    if metrics.get("n_preference", 0) > 0:
        acc = metrics["preference_accuracy"]
        if acc < gate.min_preference_accuracy:
            reasons.append(
                f"preference accuracy {acc:.2f} on {metrics['n_preference']} held-out ratings is "
                f"below the policy minimum {gate.min_preference_accuracy:.2f} (vs {ref})")
    else:
        notes.append("no rated held-out interactions: preference accuracy not measured")
    if metrics.get("n_nll", 0) > 0:
        cand, refv = metrics["nll_candidate"], metrics["nll_reference"]
        limit = max(refv * (1 + gate.max_nll_regression), refv + gate.max_nll_regression_abs)
        if cand > limit:
            reasons.append(
                f"held-out NLL on good answers rose from {refv:.3f} ({ref}) to {cand:.3f}, beyond "
                f"the tolerance ({gate.max_nll_regression:.0%} or "
                f"{gate.max_nll_regression_abs} nats/token, whichever is larger)")
    else:
        notes.append("no good held-out answers: NLL not measured")
    decided = metrics.get("answer_wins", 0) + metrics.get("answer_losses", 0)
    if gate.min_answer_win_rate is not None:
        if decided:
            rate = metrics["answer_win_rate"]
            if rate < gate.min_answer_win_rate:
                reasons.append(
                    f"answers to {metrics['n_answers']} held-out corrected prompts: closer to the "
                    f"correction than {ref}'s on {metrics['answer_wins']}, further on "
                    f"{metrics['answer_losses']} (win rate {rate:.2f}, below the policy minimum "
                    f"{gate.min_answer_win_rate:.2f})")
        elif metrics.get("n_answers"):
            notes.append(f"answers to {metrics['n_answers']} held-out corrected prompts tied "
                         f"with {ref}'s: answer win rate not decided")
        else:
            notes.append("no corrected held-out prompts: answers not compared")
    for case in golden or []:
        if not case["passed"]:
            reasons.append(f"golden case {case['prompt']!r} failed: {'; '.join(case['failures'])}")
    if not gate.golden:
        notes.append("no golden suite configured for this alias")
    evidence = metrics.get("n_heldout", 0) + len(golden or [])
    if evidence == 0 and not gate.allow_unmeasured:
        reasons.append("unmeasured: no held-out rating was scored and no golden case ran, so "
                       "nothing shows the candidate is not worse (the policy may say "
                       "gate.allow_unmeasured: true)")
    elif 0 < evidence < gate.min_evidence:
        reasons.append(f"too little evidence: {evidence} measurements (held-out ratings scored "
                       f"+ golden cases), below the policy minimum {gate.min_evidence}")
    elif evidence == 0:
        notes.append("unmeasured: promoted because the policy allows it (allow_unmeasured)")
    return Verdict(passed=not reasons, reasons=reasons, notes=notes)


def check_golden_output(case, output: str) -> list[str]:
    """The failures of one generated output against its golden case (empty when it passes)."""

    failures = [f"missing {s!r}" for s in case.must_contain if s not in output]
    failures += [f"contains forbidden {s!r}" for s in case.must_not_contain if s in output]
    if case.regex and not re.search(case.regex, output):
        failures.append(f"does not match /{case.regex}/")
    if case.json_valid:
        try:
            json.loads(output)
        except ValueError:
            failures.append("is not valid JSON")
    if case.non_empty and not output.strip():
        failures.append("is empty")
    leaked = sorted({m.group() for m in TEMPLATE_MARKUP.finditer(output)})
    if case.no_template_tokens and leaked:
        failures.append(f"leaks chat-template markup {', '.join(leaked)}")
    if case.max_repetition is not None and (rep := repetition(output)) > case.max_repetition:
        failures.append(f"repeats itself: {rep:.0%} of its word 3-grams are repeats "
                        f"(the case allows {case.max_repetition:.0%})")
    return failures


# Markup of the common chat templates (ChatML, Llama 2/3, Gemma, Mistral, Phi): in an answer
# it means the template or the stop tokens broke.
TEMPLATE_MARKUP = re.compile(r"<\|[a-z_]+\|>|\[/?INST\]|<</?SYS>>|</?s>|<(?:start|end)_of_turn>")


def repetition(text: str) -> float:
    """The share of an output's word 3-grams that repeat an earlier one (0.0 for short text):
    a degenerate loop ("the the the", a sentence over and over) scores near 1."""
    words = text.lower().split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0
