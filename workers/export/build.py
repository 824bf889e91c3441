"""One export: merge, convert to GGUF, gate every artifact against the served version, and fall
back to a less aggressive quantization when one fails."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workers.export.consistency import Tolerance, consistency, gguf_consistency, judge
from workers.export.engines import Memo, Prompt, encode_prompts, load_merged, load_served, render_prompts
from workers.export.gguf_writer import QUANTS, export_gguf, llama_cpp_available
from workers.export.merge import MergedResult, merge_adapter
from workers.export.progress import Progress, no_progress

# Most to least aggressive. "Less aggressive" for a suggestion or fallback means later in
# FALLBACK_ORDER; f16 is the floor.
FALLBACK_ORDER = QUANTS


def less_aggressive(quant: str) -> str | None:
    """The next quantization up FALLBACK_ORDER, or None at f16."""
    i = FALLBACK_ORDER.index(quant)
    return FALLBACK_ORDER[i + 1] if i + 1 < len(FALLBACK_ORDER) else None


@dataclass
class Attempt:
    format: str
    quant: str | None
    status: str  # "passed" | "failed" (outside tolerance) | "error" (could not build or run)
    path: str | None = None
    sha256: str | None = None
    bytes: int | None = None
    export_seconds: float | None = None
    gate_seconds: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)  # of the artifact's directory


@dataclass
class ExportOutcome:
    status: str  # "succeeded" | "failed"
    attempts: list[Attempt]
    merged: Attempt | None
    suggestion: str | None = None  # a less aggressive quant, when the last one failed
    failure_reason: str | None = None

    @property
    def final(self) -> Attempt:
        return self.attempts[-1]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Frozen: one shared default is safe.
DEFAULT_TOLERANCE = Tolerance()


def run_export(base_dir: str | Path, adapter_dir: str | Path, out_root: str | Path, *,
               fmt: str, quant: str | None, prompts: Sequence[Prompt],
               tolerance: Tolerance = DEFAULT_TOLERANCE, fallback: bool = False,
               max_new_tokens: int = 16, lineage: dict[str, Any] | None = None,
               progress: Progress = no_progress) -> ExportOutcome:
    """Merge, optionally convert to GGUF, and gate every artifact against the served version.

    Writes ``out_root/merged`` and ``out_root/gguf-<quant>`` per attempt. On a failed GGUF gate
    the next less aggressive quantization is suggested, and tried when ``fallback`` is true.
    """
    if fmt not in ("merged", "gguf"):
        raise ValueError(f"unknown export format {fmt!r}")
    if fmt == "gguf" and quant not in QUANTS:
        raise ValueError(f"gguf export needs a quantization among {', '.join(QUANTS)}")
    out_root = Path(out_root)
    served = Memo(load_served(base_dir, adapter_dir))
    ids = encode_prompts(base_dir, prompts)
    merged = merge_adapter(base_dir, adapter_dir, out_root / "merged", lineage=lineage,
                           progress=_sub(progress, "merge"))
    progress("merge: gate", 0.0)
    merged_attempt = _gate_merged(served, merged, ids, tolerance, max_new_tokens)
    if fmt == "merged" or merged_attempt.status != "passed":
        return _outcome([merged_attempt], merged_attempt, None)
    texts = render_prompts(base_dir, prompts)
    attempts: list[Attempt] = []
    while quant is not None:
        attempt = _gguf_attempt(served, merged, out_root / f"gguf-{quant}", quant, ids, texts,
                                tolerance, max_new_tokens, _sub(progress, f"gguf {quant}"))
        attempts.append(attempt)
        nxt = less_aggressive(quant) if attempt.status == "failed" else None
        if attempt.status == "passed" or not fallback:
            return _outcome(attempts, merged_attempt, nxt)
        quant = nxt
    return _outcome(attempts, merged_attempt, None)


def _sub(progress: Progress, stage: str) -> Progress:
    return lambda detail, frac: progress(f"{stage}: {detail}", frac)


def _gate_merged(served: Memo, merged: MergedResult, ids: list[list[int]], tol: Tolerance,
                 max_new_tokens: int) -> Attempt:
    t0 = time.perf_counter()
    metrics = consistency(served, load_merged(merged.path), ids, max_new_tokens=max_new_tokens,
                          tie_margin=tol.tie_margin)
    reasons = judge(metrics, tol, "merged")
    return Attempt("merged", None, "failed" if reasons else "passed", str(merged.path),
                   merged.sha256, merged.bytes, merged.seconds, time.perf_counter() - t0,
                   metrics, reasons, merged.files)


def _gguf_attempt(served: Memo, merged: MergedResult, out_dir: Path, quant: str,
                  ids: list[list[int]], texts: list[str], tol: Tolerance, max_new_tokens: int,
                  progress: Progress) -> Attempt:
    try:
        result = export_gguf(merged, out_dir, quant, progress=progress)
    except Exception as exc:  # noqa: BLE001 - recorded on the attempt, the job decides
        return Attempt("gguf", quant, "error", reasons=[f"conversion failed: {exc}"])
    attempt = Attempt("gguf", quant, "failed", str(result.gguf_path), result.sha256,
                      result.bytes, result.seconds, files=result.files)
    if not llama_cpp_available():
        # Not a quality verdict, so no less aggressive quantization is suggested.
        attempt.status = "error"
        attempt.reasons = ["llama-cpp-python is not installed: the GGUF cannot be gated"]
        return attempt
    t0 = time.perf_counter()
    progress("gate", 0.0)
    try:
        metrics = gguf_consistency(served, result.gguf_path, ids, texts,
                                   max_new_tokens=max_new_tokens, tie_margin=tol.tie_margin)
    except Exception as exc:  # noqa: BLE001 - a GGUF llama.cpp cannot run is a failed export
        attempt.status, attempt.reasons = "error", [f"llama.cpp could not run the GGUF: {exc}"]
        return attempt
    metrics["tensor_types"] = result.tensor_types
    attempt.metrics, attempt.gate_seconds = metrics, time.perf_counter() - t0
    attempt.reasons = judge(metrics, tol, "gguf")
    attempt.status = "failed" if attempt.reasons else "passed"
    return attempt


def _outcome(attempts: list[Attempt], merged: Attempt, suggestion: str | None) -> ExportOutcome:
    final = attempts[-1]
    if final.status == "passed":
        return ExportOutcome("succeeded", attempts, merged)
    reason = f"{final.format}{'/' + final.quant if final.quant else ''}: " + "; ".join(final.reasons)
    if suggestion:
        reason += f" (try quant {suggestion}, less aggressive)"
    return ExportOutcome("failed", attempts, merged, suggestion, reason)
