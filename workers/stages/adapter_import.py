"""The train stage of an imported adapter's run: nothing to train, so gather what the gate
scores it on (the alias's held-out ratings, split as every training run splits them) and move
the run on to evaluating. See service/domain/adapter_import.py for how such a run is created."""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import text

from service.db import repositories as repo
from service.db.models import RunState, TrainingRun
from service.db.session import session_scope
from service.domain import runs
from service.domain.adapter_import import ADAPTER_IMPORT
from service.domain.policy import Policy
from workers.context import WorkerContext, run_dir
from workers.dataset import NotEnoughData, build_dataset, write_jsonl
from workers.recipe import dataset_config, example_token_limit
from workers.redaction import get_redactor
from workers.stages.train import load_rated

log = logging.getLogger(__name__)


def is_adapter_import(ctx: WorkerContext, run_id: uuid.UUID) -> bool:
    with session_scope(ctx.sessions) as s:
        run = s.get(TrainingRun, run_id)
        return run is not None and (run.trigger or {}).get("reason") == ADAPTER_IMPORT


def prepare_gate(ctx: WorkerContext, claim: runs.Claim) -> str:
    """Write the run's held-out file from every rating the alias has (none trained the imported
    adapter here, so the whole held-out split is fair to score it on), then evaluating."""
    from transformers import AutoTokenizer  # heavy: loads torch

    with session_scope(ctx.sessions) as s:
        run = repo.get_row(s, TrainingRun, claim.run_id)
        runs.transition(s, run.id, claim.owner, RunState.training, release=False)
        policy = Policy.model_validate(run.policy)
        # Every rating so far (the run consumes none: the trigger's buffer is left as it was).
        upto = s.execute(text("SELECT coalesce(max(seq), 0) FROM feedback WHERE adapter_id = :a"),
                         {"a": run.adapter_id}).scalar_one()
        rated = load_rated(s, run.adapter_id, 0, upto, judge=False)  # the gate: humans only
    d = policy.dataset
    stats: dict = {"rated": len(rated), "rated_up_to_seq": upto, "heldout_items": 0}
    if rated:
        tokenizer = AutoTokenizer.from_pretrained(ctx.base_model())
        try:
            built = build_dataset(rated, [], tokenizer=tokenizer, redactor=get_redactor(d.redactor),
                                  policy=dataset_config(
                                      policy, max_tokens=example_token_limit(policy, ctx.context_len()),
                                      method="auto", replay_fraction=0.0, min_examples=1))
            write_jsonl(built, run_dir(ctx, claim.run_id) / "data")
            stats.update(heldout_items=len(built.heldout_raw),
                         heldout_ids=len(built.snapshot.heldout_ids))
        except NotEnoughData as exc:
            # The gate then has its golden suite only, and min_evidence decides if that is enough.
            stats["heldout_note"] = f"no held-out set: {exc}"
    with session_scope(ctx.sessions) as s:
        runs.update(s, claim.run_id, dataset_stats=stats)
        runs.transition(s, claim.run_id, claim.owner, RunState.evaluating)
    log.info("run %s: imported adapter, %d held-out ratings for its gate", claim.run_id,
             stats["heldout_items"])
    return RunState.evaluating.value
