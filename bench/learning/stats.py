"""Means with 95% intervals over seeds, bad promotions, and the issue's targets."""

from __future__ import annotations

import math
import statistics

# Two-sided 97.5% quantiles of Student's t by degrees of freedom (seeds - 1).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    """Student's t quantile for a two-sided 95% interval; between tabled dfs the smaller df's
    (wider, so never flattering); past 30 the normal quantile."""
    if df < 1:
        raise ValueError("a t interval needs at least two values")
    if df > 30:
        return 1.96
    return _T975[max(k for k in _T975 if k <= df)]


def mean_ci(values: list[float]) -> dict:
    """{"mean", "ci95": [lo, hi] or None (one value), "n", "values"} of a list of rates."""
    vals = [float(v) for v in values]
    if not vals:
        return {"mean": None, "ci95": None, "n": 0, "values": []}
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return {"mean": mean, "ci95": None, "n": 1, "values": vals}
    half = t975(len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(vals), "values": vals}


def sign_test_p(lost: int, gained: int) -> float:
    """One-sided exact sign test on paired outcomes: the chance of losing at least `lost` of the
    `lost + gained` prompts on which two versions disagree, if neither were better (1.0 when
    they never disagree)."""
    n = lost + gained
    return sum(math.comb(n, k) for k in range(lost, n + 1)) / 2 ** n if n else 1.0


def bad_promotions(base_rate: float, rounds: list[dict], alpha: float = 0.05) -> list[dict]:
    """Promoted versions that scored lower on test than the version they replaced.

    Each round records `promoted`, `candidate`, `serving_before` (what served before the
    promotion) and `serving` (measured after it, on the same test prompts). Where both carry
    per-prompt `outcomes`, each entry also says how many prompts the promotion lost and gained
    and whether the drop is beyond chance (`significant`: one-sided exact sign test at `alpha`);
    every measured drop is listed, significant or not.
    """
    out = []
    prev = base_rate
    for r in rounds:
        before = r.get("serving_before", {}).get("rate", prev)
        after = r["serving"]["rate"]
        if r.get("promoted") and after < before:
            entry = {"round": r["round"], "version": r["candidate"], "rate": after,
                     "replaced_rate": before}
            old, new = r.get("serving_before", {}).get("outcomes"), r["serving"].get("outcomes")
            if old is not None and new is not None and len(old) == len(new):
                lost = sum(1 for a, b in zip(old, new, strict=True) if a and not b)
                gained = sum(1 for a, b in zip(old, new, strict=True) if b and not a)
                p = sign_test_p(lost, gained)
                entry.update(lost=lost, gained=gained, p_value=round(p, 4), significant=p < alpha)
            out.append(entry)
        prev = after
    return out


def significant(bad: list[dict]) -> list[dict]:
    """The bad promotions whose drop is beyond chance, or that could not be tested (no
    per-prompt outcomes recorded: counted, never excused)."""
    return [b for b in bad if b.get("significant", True)]


def summarize(runs: list[dict]) -> dict:
    """Per task and arm: base, icl, serving per round, oracle (mean and 95% interval over seeds),
    the gain, the share of the oracle, bad promotions, and the targets met or missed."""
    out: dict[str, dict] = {}
    for task in sorted({r["task"] for r in runs}):
        out[task] = {}
        for arm in sorted({r["arm"] for r in runs if r["task"] == task}):
            group = [r for r in runs if r["task"] == task and r["arm"] == arm]
            n_rounds = max(len(r["rounds"]) for r in group)
            finals = [r["rounds"][-1]["serving"]["rate"] if r["rounds"] else r["base"]["rate"]
                      for r in group]
            bases = [r["base"]["rate"] for r in group]
            icl_final = [r["rounds"][-1]["icl"]["rate"] for r in group
                         if r["rounds"] and r["rounds"][-1].get("icl")]
            oracles = [r["oracle"]["rate"] for r in group
                       if (r.get("oracle") or {}).get("rate") is not None]
            s = {
                "seeds": [r["seed"] for r in group],
                "base": mean_ci(bases),
                "serving_by_round": [mean_ci([r["rounds"][k]["serving"]["rate"] for r in group
                                              if len(r["rounds"]) > k]) for k in range(n_rounds)],
                "icl_by_round": [mean_ci([r["rounds"][k]["icl"]["rate"] for r in group
                                          if len(r["rounds"]) > k and r["rounds"][k].get("icl")])
                                 for k in range(n_rounds)],
                "final": mean_ci(finals),
                "gain_points": mean_ci([100 * (f - b) for f, b in zip(finals, bases, strict=True)]),
                "oracle": mean_ci(oracles),
                "bad_promotions": sum(len(r["bad_promotions"]) for r in group),
                "significant_bad_promotions": sum(len(significant(r["bad_promotions"]))
                                                  for r in group),
                "promotions": sum(r2.get("promoted", False) for r in group for r2 in r["rounds"]),
                "rollbacks": sum(len(r2.get("rolled_back", [])) for r in group for r2 in r["rounds"]),
            }
            final = s["final"]["mean"]
            targets = {"bad_promotions_0": s["bad_promotions"] == 0,
                       "significant_bad_promotions_0": s["significant_bad_promotions"] == 0}
            if arm == "clean":
                targets["gain_30_points"] = s["gain_points"]["mean"] >= 30
                if icl_final:
                    targets["at_or_above_icl"] = final >= statistics.fmean(icl_final)
                if oracles and statistics.fmean(oracles) > 0:
                    s["share_of_oracle"] = final / statistics.fmean(oracles)
                    targets["80pct_of_oracle"] = s["share_of_oracle"] >= 0.8
            s["targets"] = targets
            out[task][arm] = s
    return out
