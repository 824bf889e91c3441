"""Tenant-free metrics: what /metrics serves when no metrics token is configured.

Every series labelled with a tenant, an alias or a version (whose name holds both) is summed
over those labels where a sum means something (counters, histograms, counts); gauges that
describe one alias (a duration, a rate, a threshold) are left out. Nothing that names a
tenant's alias reaches an unauthenticated scraper.
"""

from __future__ import annotations

from collections import OrderedDict

from prometheus_client.parser import text_string_to_metric_families

PRIVATE = frozenset({"tenant", "alias", "version"})
# Gauges whose sum over tenants is still a total (ratings waiting, rollbacks, exports, bytes,
# versions resident per replica and role).
SUMMABLE_GAUGES = frozenset({"flywheel_feedback_buffer", "flywheel_rollbacks", "flywheel_exports",
                             "flywheel_export_bytes", "flywheel_runs", "flywheel_ratings",
                             "flywheel_judge_agreement_pairs", "flywheel_judge_agreement_agree",
                             "flywheel_judge_skipped", "flywheel_resident_versions"})


def tenant_free(exposition: str) -> str:
    """The exposition text with private labels summed away (see the module's docstring)."""
    out: list[str] = []
    for family in text_string_to_metric_families(exposition):
        private = any(PRIVATE & set(s.labels) for s in family.samples)
        if private and family.type == "gauge" and family.name not in SUMMABLE_GAUGES:
            continue
        sums: OrderedDict[tuple, float] = OrderedDict()
        for s in family.samples:
            if private and s.name.endswith("_created"):
                continue  # a creation timestamp per labelled series: no sum of those means anything
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in PRIVATE))
            sums[(s.name, labels)] = sums.get((s.name, labels), 0.0) + s.value
        kind = family.type if family.type != "unknown" else "untyped"
        # The text format names a counter's family by its _total sample (the parser strips it).
        name = f"{family.name}_total" if kind == "counter" else family.name
        out.append(f"# HELP {name} {_escape_help(family.documentation)}")
        out.append(f"# TYPE {name} {kind}")
        for (name, labels), value in sums.items():
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            out.append(f"{name}{{{text}}} {_num(value)}" if text else f"{name} {_num(value)}")
    return "\n".join(out) + "\n"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _num(v: float) -> str:
    return repr(float(v)) if v not in (float("inf"), float("-inf")) else ("+Inf" if v > 0 else "-Inf")
