"""The consistency gate: an export's answers against the served version's, and the tolerance
they must stay within."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers.export.engines import LanguageModel, LlamaCppLM


def consistency(reference: LanguageModel, candidate: LanguageModel,
                prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 16,
                tie_margin: float = 0.0) -> dict[str, Any]:
    """Compare a candidate engine with the reference on the reference's greedy continuations.

    * exact_match: share of prompts whose free-running greedy output is identical.
    * token_agreement: teacher-forced, share of continuation positions where the candidate's
      argmax equals the reference's (no cascade after a first divergence).
    * decisive_agreement: the same over positions where the reference's top-1 beats its top-2
      by at least ``tie_margin`` nats; near-ties flip under any change of kernel or precision,
      so they say little about the export (n_decisive counts those positions).
    * nll_reference / nll_candidate: mean per-token NLL (nats) of the reference continuation;
      nll_delta = candidate - reference, ppl_ratio = exp(nll_delta).
    * max_abs_logprob_delta: worst single-token log-prob difference; kl_mean: mean KL(ref||cand)
      of the next-token distributions over the continuation positions.
    """
    exact = agree = n_pos = agree_decisive = n_decisive = 0
    nll_ref = nll_cand = kl = 0.0
    max_delta = 0.0
    per_prompt = []
    for ids in prompts:
        ids = list(ids)
        cont = reference.greedy(ids, max_new_tokens)
        cand_cont = candidate.greedy(ids, max_new_tokens)
        exact += cand_cont == cont
        full = ids + cont
        # Row i predicts full[i + 1]; the continuation is predicted by rows len(ids)-1 .. end-1.
        rows = slice(len(ids) - 1, len(full) - 1)
        lp_ref = reference.logprobs(full)[rows].astype(np.float64)
        lp_cand = candidate.logprobs(full)[rows].astype(np.float64)
        targets = np.asarray(cont)
        t_ref = lp_ref[np.arange(len(cont)), targets]
        t_cand = lp_cand[np.arange(len(cont)), targets]
        same = lp_cand.argmax(-1) == lp_ref.argmax(-1)
        top2 = np.sort(lp_ref, axis=-1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) >= tie_margin
        agree += int(same.sum())
        agree_decisive += int((same & decisive).sum())
        n_decisive += int(decisive.sum())
        n_pos += len(cont)
        nll_ref -= float(t_ref.sum())
        nll_cand -= float(t_cand.sum())
        max_delta = max(max_delta, float(np.abs(t_cand - t_ref).max()))
        kl += float((np.exp(lp_ref) * (lp_ref - lp_cand)).sum())
        per_prompt.append({"n_prompt": len(ids), "reference": cont, "candidate": cand_cont,
                           "token_agreement": float(same.mean())})
    n = max(n_pos, 1)
    delta = (nll_cand - nll_ref) / n
    return {
        "n_prompts": len(prompts), "n_tokens": n_pos,
        "exact_match": exact / max(len(prompts), 1),
        "token_agreement": agree / n,
        # With no decisive position at all, fall back to every position rather than pass vacuously.
        "decisive_agreement": agree_decisive / n_decisive if n_decisive else agree / n,
        "n_decisive": n_decisive, "tie_margin": tie_margin,
        "nll_reference": nll_ref / n, "nll_candidate": nll_cand / n,
        "nll_delta": delta, "ppl_ratio": math.exp(delta),
        "max_abs_logprob_delta": max_delta, "kl_mean": kl / n,
        "per_prompt": per_prompt,
    }


def tokenizer_parity(candidate: LlamaCppLM, texts: Sequence[str],
                     expected: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Share of texts llama.cpp tokenizes exactly as the served (HF) tokenizer does."""
    mismatches = [i for i, (t, e) in enumerate(zip(texts, expected, strict=True))
                  if candidate.tokenize(t) != list(e)]
    return {"tokenizer_agreement": 1 - len(mismatches) / max(len(texts), 1),
            "tokenizer_mismatches": mismatches}


def gguf_consistency(served: LanguageModel, path: str | Path, ids: list[list[int]],
                     texts: list[str], *, max_new_tokens: int, tie_margin: float
                     ) -> dict[str, Any]:
    """:func:`consistency` of a GGUF run through llama.cpp's bindings against the served version,
    plus :func:`tokenizer_parity` on the rendered prompts."""
    lm = LlamaCppLM.load(path, n_ctx=_ctx_for(ids, max_new_tokens), stop_ids=served.stop_ids)
    try:
        metrics = consistency(served, lm, ids, max_new_tokens=max_new_tokens,
                              tie_margin=tie_margin)
        metrics.update(tokenizer_parity(lm, texts, ids))
    finally:
        lm.close()
    return metrics


def _ctx_for(ids: list[list[int]], max_new_tokens: int) -> int:
    return max(64, max((len(i) for i in ids), default=0) + max_new_tokens + 8)


@dataclass(frozen=True)
class Tolerance:
    """Limits beyond which an export fails. Merged exports must match greedily (no quantization
    happened); GGUF exports get these limits. Defaults are calibrated in BENCHMARKS.md."""

    # Teacher-forced greedy agreement, counted where the served version's top-1 leads its
    # top-2 by at least tie_margin nats (0 = every position).
    min_token_agreement: float = 0.95
    tie_margin: float = 0.05
    max_nll_delta: float = 0.02  # nats per token, absolute
    min_exact_match: float | None = None  # free-running greedy; None = not gated
    min_tokenizer_agreement: float = 1.0
    merged_exact: bool = True


def judge(metrics: dict[str, Any], tol: Tolerance, fmt: str) -> list[str]:
    """One sentence per failed criterion (empty = passed)."""
    if metrics["n_tokens"] == 0:
        return ["no held-out or golden prompts to compare on: the consistency gate cannot run"]
    reasons = []
    if fmt == "merged" and tol.merged_exact and metrics["exact_match"] < 1.0:
        reasons.append(f"merged model's greedy output differs from the served version on "
                       f"{1 - metrics['exact_match']:.0%} of prompts")
    agreement = metrics["decisive_agreement"]
    if agreement < tol.min_token_agreement:
        reasons.append(f"greedy token agreement {agreement:.3f} (on {metrics['n_decisive']} of "
                       f"{metrics['n_tokens']} positions where the served version leads by "
                       f">= {metrics['tie_margin']:g} nats; {metrics['token_agreement']:.3f} on "
                       f"all) is below {tol.min_token_agreement:.3f}")
    if abs(metrics["nll_delta"]) > tol.max_nll_delta:
        reasons.append(f"per-token NLL delta {metrics['nll_delta']:+.4f} nats (perplexity x"
                       f"{metrics['ppl_ratio']:.3f}) exceeds ±{tol.max_nll_delta:.4f}")
    if tol.min_exact_match is not None and metrics["exact_match"] < tol.min_exact_match:
        reasons.append(f"exact greedy match {metrics['exact_match']:.2f} is below "
                       f"{tol.min_exact_match:.2f}")
    tok = metrics.get("tokenizer_agreement")
    if tok is not None and tok < tol.min_tokenizer_agreement:
        reasons.append(f"llama.cpp tokenizes {1 - tok:.0%} of prompts differently from the "
                       "served tokenizer")
    return reasons
