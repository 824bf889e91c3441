"""The train stage (pending -> training -> evaluating): build the dataset from the run's feedback
window, train a candidate version on it, record it. Called by pipeline.advance under the lease."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import time
import uuid
from pathlib import Path

from sqlalchemy import text

from service.db import repositories as repo
from service.db.models import Adapter, AdapterVersion, RunState, TrainingRun
from service.db.session import session_scope
from service.domain import runs
from service.domain.policy import Policy
from service.engine.artifact import ArtifactRejected, artifact_sha256, verify_artifact
from service.imports.store import imported_from
from service.models.inspect import ModelError
from workers.context import StepFailed, WorkerContext, disk_full_reason, run_dir
from workers.dataset import NotEnoughData, RatedInteraction, build_dataset, write_jsonl
from workers.lease import LeaseKeeper, LeaseLost
from workers.quantization import plan_quantization
from workers.recipe import dataset_config, example_token_limit, human_raters, training_config
from workers.redaction import get_redactor
from workers.trainer.backend import TrainJob
from workers.trainer.drive import TrainingFailed, backend_for, drive

log = logging.getLogger(__name__)

REPLAY_POOL_LIMIT = 2000


_RATED = text("""
SELECT i.id, i.messages, i.params, i.response_text, i.response_tool_calls, i.finish_reason,
       i.served_model, f.rating, f.correction, f.rater_id, f.created_at, f.api_key_id, f.source
FROM feedback f JOIN interactions i ON i.id = f.interaction_id
WHERE f.adapter_id = :adapter_id AND f.seq > :lo AND f.seq <= :hi
  AND (NOT :good_only OR f.rating = 'up' OR f.correction IS NOT NULL)
  AND (f.source = 'human' OR (:judge AND NOT EXISTS (
      -- A human rating of the same interaction wins over the judge's (calibration samples).
      SELECT 1 FROM feedback h WHERE h.interaction_id = f.interaction_id AND h.source = 'human')))
ORDER BY f.seq DESC
LIMIT :limit
""")


def load_rated(session, adapter_id: uuid.UUID, lo: int, hi: int, *, good_only: bool = False,
               judge: bool = True, limit: int = 1_000_000) -> list:
    """Rated interactions of an adapter with feedback seq in (lo, hi]; judge=False: human
    ratings only."""
    rows = session.execute(_RATED, {"adapter_id": adapter_id, "lo": lo, "hi": hi,
                                    "good_only": good_only, "judge": judge, "limit": limit})
    return [RatedInteraction(interaction_id=str(r.id), messages=r.messages,
                             response_text=r.response_text, rating=r.rating,
                             correction=r.correction, rater_id=r.rater_id,
                             created_at=r.created_at, version=r.served_model,
                             posted_by=str(r.api_key_id or ""), params=r.params or {},
                             response_tool_calls=r.response_tool_calls,
                             finish_reason=r.finish_reason, source=r.source) for r in rows]


def _recorded_artifact(out_dir: Path) -> tuple[Path, str, dict, dict]:
    lineage_file = out_dir / "lineage.json"
    lineage = json.loads(lineage_file.read_text()) if lineage_file.exists() else {}
    training = lineage.get("training", {})
    return (out_dir, artifact_sha256(out_dir), training.get("metrics", {}),
            training.get("library_versions", {}))


def check_quantization(ctx: WorkerContext, claim: runs.Claim, policy: Policy) -> dict:
    """Decide the run's quantization before any data or model is loaded: a qlora policy this
    machine cannot honour fails the run naming what is missing, unless it allows the LoRA
    fallback; then the run's metrics say so from the start of training (CLI, ops page). Returns
    the metrics entry to keep ({} without a quantization)."""
    t = policy.training
    plan = plan_quantization(t.quantization, t.quantization_fallback)
    if plan.requested == "none":
        return {}
    entry = {"quantization": plan.as_dict()}
    with session_scope(ctx.sessions) as s:
        runs.update(s, claim.run_id, owner=claim.owner, metrics=entry)
    if plan.failure:
        raise StepFailed(plan.failure)
    if plan.fallback:
        log.warning("run %s: %s", claim.run_id, plan.reason)
    return entry


def _train_as_job(ctx: WorkerContext, claim: runs.Claim, spec: dict, base_dir: Path,
                  out_dir: Path) -> tuple[Path, str, dict, dict]:
    """Train through the trainer backend (`accelerate launch`, workers/trainer/), re-attaching
    to the job the run already has when a worker died following it."""
    with session_scope(ctx.sessions) as s:
        ref = repo.get_row(s, TrainingRun, claim.run_id).trainer_job

    def store_ref(new_ref: dict) -> None:
        with session_scope(ctx.sessions) as s:
            if not runs.update(s, claim.run_id, owner=claim.owner, trainer_job=new_ref):
                raise LeaseLost(f"{claim.run_id}: lease lost to another worker")

    def new_job(attempt: int) -> TrainJob:
        # Absolute: the reference must mean the same directory to any worker that reads it.
        return TrainJob(job_dir=base_dir.resolve() / f"job-{attempt}", spec=spec, attempt=attempt)

    settings = ctx.settings
    with LeaseKeeper(ctx.sessions, claim.run_id, claim.owner, settings.run_lease_s) as lease:
        try:
            result = drive(backend_for(settings), ref=ref, new_job=new_job, store_ref=store_ref,
                           report=lease.report, max_restarts=settings.train_max_restarts,
                           interval_s=settings.train_poll_interval_s)
        except TrainingFailed as exc:
            err = exc.error or {}
            if err.get("errno") == errno.ENOSPC:  # the pipeline words a full disk for ops
                raise OSError(errno.ENOSPC, str(exc)) from exc
            full = disk_full_reason(ctx, exc)
            raise StepFailed(full or str(exc)) from exc
    artifact = Path(result["artifact_dir"])
    # The artifact was written by another process: the version records what is on disk.
    sha = artifact_sha256(artifact)
    if artifact != out_dir or sha != result["sha256"]:
        raise StepFailed(f"training job reported artifact {artifact} ({result['sha256'][:12]}), "
                         f"found {out_dir} ({sha[:12]})")
    return artifact, sha, result["metrics"], result["library_versions"]


def train(ctx: WorkerContext, claim: runs.Claim) -> str:
    """Build the dataset from the run's feedback window and train a candidate version."""
    from transformers import AutoTokenizer  # heavy: loads torch

    try:
        base_model = ctx.base_model()
    except ModelError as exc:
        raise StepFailed(f"base model: {exc}") from exc
    started = time.monotonic()  # the dataset's share of the training state, for the run's stats
    with session_scope(ctx.sessions) as s:
        run = repo.get_row(s, TrainingRun, claim.run_id)
        if run.candidate_version_id is not None:  # trained before a crash; only the move is left
            runs.transition(s, run.id, claim.owner, RunState.evaluating)
            return RunState.evaluating.value
        runs.transition(s, run.id, claim.owner, RunState.training, release=False)
        adapter = repo.get_row(s, Adapter, run.adapter_id)
        policy = Policy.model_validate(run.policy)
        new = load_rated(s, adapter.id, run.feedback_seq_from, run.feedback_seq_to)
        # Replay is earlier human-approved answers: the judge's ratings train once, capped.
        replay_pool = load_rated(s, adapter.id, 0, run.feedback_seq_from, good_only=True,
                                 judge=False, limit=REPLAY_POOL_LIMIT)
        parent = repo.get_row(s, AdapterVersion, run.parent_version_id) if run.parent_version_id else None
        parent_dir = Path(parent.artifact_path) if parent and policy.training.start_from == "serving" else None
        parent_info = {"version_id": str(parent.id), "lora_name": parent.lora_name,
                       "sha256": parent.sha256} if parent else None
        parent_sha = parent.sha256 if parent else None
        tenant_id, alias, adapter_id = adapter.tenant_id, adapter.alias, adapter.id
    quantization = check_quantization(ctx, claim, policy)

    if parent_dir is not None:
        assert parent_sha is not None  # both come from the parent version
        # Training loads the parent's weights: only after its checksum matches the record.
        try:
            verify_artifact(parent_dir, expected_sha256=parent_sha, engine_base_model=base_model,
                            max_lora_rank=ctx.settings.vllm_max_lora_rank)
        except ArtifactRejected as exc:
            raise StepFailed(f"parent version failed verification: {exc.reason}") from exc
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    token_limit = example_token_limit(policy, ctx.context_len())
    data_config = dataset_config(policy, new, max_tokens=token_limit)
    try:
        built = build_dataset(new, replay_pool, tokenizer=tokenizer,
                              redactor=get_redactor(policy.dataset.redactor), policy=data_config)
    except NotEnoughData as exc:
        with session_scope(ctx.sessions) as s:
            runs.update(s, claim.run_id, dataset_stats=getattr(exc, "stats", None) or {})
        raise StepFailed(f"not enough usable data: {exc}") from exc
    base_dir = run_dir(ctx, claim.run_id)
    data_paths = write_jsonl(built, base_dir / "data")
    with session_scope(ctx.sessions) as s:
        runs.update(s, claim.run_id, method=built.method, method_reason=built.reason,
                    dataset_stats={**built.stats, "snapshot_sha256": built.snapshot.sha256,
                                   "heldout_ids": len(built.snapshot.heldout_ids),
                                   "raters": len(human_raters(new)),
                                   "rater_cap": data_config.max_rater_share,
                                   "build_seconds": round(time.monotonic() - started, 3),
                                   "warnings": list(built.warnings)})

    lineage = {"run_id": str(claim.run_id), "parent": parent_info, "base_model": base_model,
               "base_model_provenance": ctx.base_model_provenance(),
               "dataset": {"sha256": built.snapshot.sha256,
                           "interaction_ids": built.snapshot.interaction_ids,
                           # Which of them came from which feedback import, per import.
                           "imports": imported_from(ctx.sessions, built.snapshot)},
               "method": built.method, "method_reason": built.reason,
               "policy": policy.training.model_dump()}
    out_dir = base_dir / "adapter"
    if (out_dir / "adapter_model.safetensors").exists():
        # A previous attempt finished training but died before recording it: artifacts are
        # written atomically, so this one is complete.
        trained = _recorded_artifact(out_dir)
    else:
        config = training_config(policy, built.method, max_length=token_limit,
                                 desirable_weight=built.kto_desirable_weight,
                                 undesirable_weight=built.kto_undesirable_weight)
        spec = {"base_model_dir": base_model,
                "data": {"train": str(data_paths[f"{built.method}_train"]),
                         "eval": str(data_paths[f"{built.method}_heldout"])},
                "config": dataclasses.asdict(config), "out_dir": str(out_dir),
                "work_dir": str(base_dir / "work"),
                "parent_adapter_dir": str(parent_dir) if parent_dir else None, "lineage": lineage}
        trained = _train_as_job(ctx, claim, spec, base_dir, out_dir)
    with session_scope(ctx.sessions) as s:
        adapter = repo.get_row(s, Adapter, adapter_id)
        version = repo.create_version(
            s, adapter, artifact_path=str(trained[0]), sha256=trained[1],
            parent_version_id=parent.id if parent else None, run_id=claim.run_id,
            lineage={**lineage, "training": trained[2], "library_versions": trained[3]})
        runs.transition(s, claim.run_id, claim.owner, RunState.evaluating,
                        candidate_version_id=version.id,
                        metrics={**quantization, "training": trained[2]})
        repo.audit(s, tenant_id=tenant_id, actor="worker", action="run.trained", target_type="run",
                   target_id=str(claim.run_id),
                   detail={"version": version.lora_name, "method": built.method})
    log.info("run %s trained %s (%s)", claim.run_id, alias, built.method)
    return RunState.evaluating.value
