"""The export stage: claim an export row, verify the version's artifact, build and gate the
export (workers.export), record the outcome. The Celery task only calls :func:`run_job`."""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select

from service.db import repositories as repo
from service.db.models import Adapter, AdapterVersion, Export, ExportStatus, TrainingRun
from service.db.session import session_scope
from service.domain import exports
from service.domain.policy import Policy
from service.engine.artifact import ArtifactRejected, verify_artifact
from service.models.inspect import ModelError
from workers.context import WorkerContext, disk_full_reason, heldout_raw
from workers.export import Tolerance, run_export
from workers.lease import LeaseKeeper, LeaseLost

log = logging.getLogger(__name__)

# Share of the job each phase takes, for the overall fraction and the ETA (rough: on the tiny
# model and on 7B alike, the merge and the GGUF gate dominate).
_PHASES = {"merged": {"merge": (0.0, 0.6), "merge gate": (0.6, 1.0)},
           "gguf": {"merge": (0.0, 0.3), "merge gate": (0.3, 0.45), "convert": (0.45, 0.75),
                    "gate": (0.75, 1.0)}}


def export_prompts(policy: Policy, heldout: list[dict[str, Any]]) -> list:
    """Golden prompts (as messages) first, then held-out prompts (rendered text), deduplicated,
    at most policy.export.max_prompts."""
    out: list = []
    seen: set[str] = set()
    for case in policy.gate.golden:
        if case.prompt not in seen:
            seen.add(case.prompt)
            out.append([{"role": "user", "content": case.prompt}])
    for record in heldout:
        prompt = record.get("prompt")
        if isinstance(prompt, str) and prompt and prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out[: policy.export.max_prompts]


def _heldout(ctx: WorkerContext, session, version: AdapterVersion, limit: int) -> list[dict]:
    """Held-out records of the version's own run, then of the alias's other runs, newest first
    (a version registered by hand has no run of its own)."""
    run_ids = [version.run_id] if version.run_id else []
    run_ids += [r for r in session.scalars(
        select(TrainingRun.id).where(TrainingRun.adapter_id == version.adapter_id)
        .order_by(TrainingRun.created_at.desc()).limit(20)) if r != version.run_id]
    records: list[dict] = []
    for run_id in run_ids:
        records += heldout_raw(ctx, run_id)
        if len(records) >= limit:
            break
    return records


class _Reporter:
    """Turns workers.export's (stage, fraction) callbacks into progress with an ETA; the lease
    keeper writes it (at most once a second) and renews the lease meanwhile."""

    def __init__(self, keeper: LeaseKeeper, fmt: str) -> None:
        self.keeper, self.fmt = keeper, fmt
        self.t0 = time.monotonic()

    def _overall(self, stage: str, fraction: float) -> float:
        head, _, detail = stage.partition(": ")
        if head == "merge":
            phase = "merge gate" if detail == "gate" else "merge"
        else:  # "gguf q8_0: <detail>"
            phase = "gate" if detail.startswith("gate") else "convert"
        lo, hi = _PHASES[self.fmt].get(phase, (0.0, 1.0))
        return lo + (hi - lo) * min(max(fraction, 0.0), 1.0)

    def __call__(self, stage: str, fraction: float) -> None:
        overall = self._overall(stage, fraction)
        elapsed = time.monotonic() - self.t0
        self.keeper.report({
            "stage": stage, "fraction": round(overall, 3), "elapsed_s": round(elapsed, 1),
            "eta_s": round(elapsed * (1 - overall) / overall, 1) if overall >= 0.05 else None})


def run_job(ctx: WorkerContext, export_id: uuid.UUID) -> str:
    """Claim the export and build it; returns its final status (or why nothing was done)."""
    with session_scope(ctx.sessions) as s:
        if not exports.claim(s, export_id, ctx.worker_id, ctx.settings.run_lease_s):
            return "not claimable (done, or held by another worker)"
        export = s.get(Export, export_id)
        assert export is not None  # the claim above just updated it, in this transaction
        version = repo.get_row(s, AdapterVersion, export.version_id)
        adapter = repo.get_row(s, Adapter, export.adapter_id)
        policy = ctx.policies.for_alias(adapter.alias, adapter.tenant_id)
        heldout = _heldout(ctx, s, version, policy.export.max_prompts)
        job: dict[str, Any] = {"fmt": export.format, "quant": export.requested_quant, "fallback": export.fallback,
               "artifact": version.artifact_path, "sha256": version.sha256,
               "lora_name": version.lora_name, "tenant_id": adapter.tenant_id,
               "lineage": {"alias": adapter.alias, "tenant": adapter.tenant_id,
                           "version": version.number, "version_id": str(version.id),
                           "lora_name": version.lora_name, "export_id": str(export_id),
                           "requested_by": export.requested_by}}
    owner, lease_s, t0 = ctx.worker_id, ctx.settings.run_lease_s, time.monotonic()
    keeper = LeaseKeeper(ctx.sessions, export_id, owner, lease_s,
                         renew=lambda s, p: exports.report(s, export_id, owner, lease_s, p))
    try:
        with keeper:
            status, fields = _build(ctx, export_id, job, policy, heldout,
                                    _Reporter(keeper, job["fmt"]))
        if keeper.lost:
            raise LeaseLost(f"export {export_id}: lease lost to another worker")
    except LeaseLost as exc:
        log.warning("%s; leaving it", exc)
        return "lease lost"
    except Exception as exc:  # noqa: BLE001 - any crash is the export's error, with its reason
        reason = disk_full_reason(ctx, exc, retry="export again")
        if reason is None:
            log.exception("export %s crashed", export_id)
            reason = f"export crashed: {type(exc).__name__}: {exc}"
        status, fields = ExportStatus.error, {"failure_reason": reason[:2000]}
        shutil.rmtree(_out_root(ctx, export_id), ignore_errors=True)
    fields["progress"] = {"stage": status.value, "fraction": 1.0,
                          "elapsed_s": round(time.monotonic() - t0, 1), "eta_s": 0.0}
    with session_scope(ctx.sessions) as s:
        if not exports.finish(s, export_id, ctx.worker_id, status, **fields):
            return "lease lost"
        repo.audit(s, tenant_id=job["tenant_id"], actor="worker", action=f"export.{status.value}",
                   target_type="export", target_id=str(export_id),
                   reason=fields.get("failure_reason"),
                   detail={"version": job["lora_name"], "format": job["fmt"],
                           "quant": fields.get("quant", job["quant"]),
                           "sha256": fields.get("sha256")})
    log.info("export %s of %s: %s", export_id, job["lora_name"], status.value)
    return status.value


def _out_root(ctx: WorkerContext, export_id: uuid.UUID) -> Path:
    return ctx.settings.resolved_artifact_dir / "exports" / str(export_id)


def _build(ctx: WorkerContext, export_id: uuid.UUID, job: dict[str, Any], policy: Policy,
           heldout: list[dict], reporter: _Reporter) -> tuple[ExportStatus, dict[str, Any]]:
    try:
        base_model = ctx.base_model()
    except ModelError as exc:
        return ExportStatus.error, {"failure_reason": f"base model: {exc}"}
    reporter.keeper.report({"stage": "verifying the adapter artifact", "fraction": 0.0,
                            "elapsed_s": 0.0, "eta_s": None})
    try:
        # The export loads these weights: only after their checksum matches the record.
        verify_artifact(job["artifact"], expected_sha256=job["sha256"],
                        engine_base_model=base_model, max_lora_rank=ctx.settings.vllm_max_lora_rank)
    except ArtifactRejected as exc:
        return ExportStatus.error, {"failure_reason": f"version {job['lora_name']} failed "
                                                      f"verification: {exc.reason}"}
    prompts = export_prompts(policy, heldout)
    if not prompts:
        return ExportStatus.error, {"failure_reason": "no golden or held-out prompts to compare "
                                    "the export with the served version on: add gate.golden "
                                    "cases to the alias's policy"}
    out_root = _out_root(ctx, export_id)
    outcome = run_export(base_model, job["artifact"], out_root, fmt=job["fmt"],
                         quant=job["quant"], prompts=prompts,
                         tolerance=Tolerance(**policy.export.tolerance.model_dump()),
                         fallback=job["fallback"], max_new_tokens=policy.export.max_new_tokens,
                         lineage=job["lineage"], progress=reporter)
    final = outcome.final
    passed = outcome.status == "succeeded"
    # Only a passed export stays on disk, and only what it delivers: the merged intermediate of
    # a GGUF is as large as the base model, and a failed export cannot be downloaded (its
    # numbers, sizes and sha256 stay in metrics).
    delivered = None
    if passed:
        assert final.path is not None  # a passed attempt has its artifact
        delivered = Path(final.path).parent if final.format == "gguf" else Path(final.path)
    if delivered is None:
        shutil.rmtree(out_root, ignore_errors=True)
    for child in out_root.iterdir() if out_root.is_dir() else []:
        if child != delivered:
            shutil.rmtree(child, ignore_errors=True)
    fields: dict[str, Any] = {
        "quant": final.quant, "suggestion": outcome.suggestion,
        "failure_reason": outcome.failure_reason,
        "metrics": {"attempts": [_attempt(a) for a in outcome.attempts],
                    "merged": _attempt(outcome.merged) if outcome.merged else None,
                    "prompts": len(prompts), "tolerance": policy.export.tolerance.model_dump()},
    }
    if delivered is not None:
        # Hashed once, as the export was sealed (a 7B GGUF is gigabytes to re-read).
        lineage_file, files = delivered / "lineage.json", final.files
        fields.update(path=str(delivered), sha256=final.sha256, files=files,
                      bytes=sum(f["bytes"] for f in files),
                      lineage=json.loads(lineage_file.read_text()) if lineage_file.is_file() else {})
    if passed:
        return ExportStatus.passed, fields
    return (ExportStatus.failed if final.status == "failed" else ExportStatus.error), fields


def _attempt(a) -> dict[str, Any]:
    """An attempt for the DB: its numbers and reasons, without per-token detail."""
    metrics = {k: v for k, v in a.metrics.items() if k != "per_prompt"}
    return {"format": a.format, "quant": a.quant, "status": a.status, "sha256": a.sha256,
            "bytes": a.bytes, "export_seconds": a.export_seconds, "gate_seconds": a.gate_seconds,
            "metrics": metrics, "reasons": a.reasons}
