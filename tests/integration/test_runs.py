"""service/domain/runs.py, the one writer of run rows, against the session's real Postgres: stages add
their part of a run's JSON columns without erasing another's, and every finished state is
stamped with finished_at."""

from __future__ import annotations

import uuid

from sqlalchemy import select

from service.db.models import Adapter, RunState, TrainingRun
from service.db.session import session_scope
from service.domain import runs


def _run(db_sessions, tenant: str, alias: str, state: RunState, **fields) -> uuid.UUID:
    with session_scope(db_sessions) as s:
        adapter = s.scalars(select(Adapter).where(Adapter.tenant_id == tenant,
                                                  Adapter.alias == alias)).one()
        columns = {"trigger": {}, "policy": {}, "progress": {}, "dataset_stats": {}, "metrics": {},
                   "verdict": {}, **fields}
        run = TrainingRun(tenant_id=tenant, adapter_id=adapter.id, state=state.value, **columns)
        s.add(run)
        s.flush()
        return run.id


def _get(db_sessions, run_id: uuid.UUID) -> TrainingRun:
    with db_sessions() as s:
        return s.get(TrainingRun, run_id)


def test_json_parts_merge_and_dataset_stats_are_set_whole(db_sessions, tenant, make_alias):
    alias = make_alias(tenant)
    run_id = _run(db_sessions, tenant, alias, RunState.canary,
                  metrics={"training": {"loss": 1.5}}, progress={"step": 3, "total_steps": 3},
                  verdict={"passed": True})
    with session_scope(db_sessions) as s:
        assert runs.transition(s, run_id, None, RunState.live, metrics={"deploy": {"ok": True}},
                               progress={"deployed_at": "2025-01-01T00:00:00+00:00"},
                               verdict={"watch": "kept"})
        runs.update(s, run_id, dataset_stats={"sft_train": 8, "warnings": ["a"]})
        runs.update(s, run_id, dataset_stats={"sft_train": 9}, method="sft")
    run = _get(db_sessions, run_id)
    assert run.state == "live" and run.finished_at is not None and run.method == "sft"
    assert run.metrics == {"training": {"loss": 1.5}, "deploy": {"ok": True}}
    assert run.progress == {"step": 3, "total_steps": 3, "deployed_at": "2025-01-01T00:00:00+00:00"}
    assert run.verdict == {"passed": True, "watch": "kept"}
    assert run.dataset_stats == {"sft_train": 9}


def test_a_write_under_someone_elses_lease_changes_nothing(db_sessions, tenant, make_alias):
    alias = make_alias(tenant)
    run_id = _run(db_sessions, tenant, alias, RunState.training, lease_owner="worker-a")
    with session_scope(db_sessions) as s:
        assert not runs.update(s, run_id, owner="worker-b", metrics={"quantization": {}})
        assert not runs.transition(s, run_id, "worker-b", RunState.failed, failure_reason="x")
        assert runs.update(s, run_id, owner="worker-a", metrics={"quantization": {"plan": "lora"}})
    run = _get(db_sessions, run_id)
    assert run.state == "training" and run.failure_reason is None and run.finished_at is None
    assert run.metrics == {"quantization": {"plan": "lora"}}


def test_a_superseded_run_is_finished(db_sessions, tenant, make_alias):
    alias = make_alias(tenant)
    canary = _run(db_sessions, tenant, alias, RunState.canary)
    promoted = _run(db_sessions, tenant, alias, RunState.live)
    with session_scope(db_sessions) as s:
        runs.supersede_others(s, _get(db_sessions, promoted).adapter_id, promoted)
    old = _get(db_sessions, canary)
    assert old.state == "superseded" and old.finished_at is not None
    assert _get(db_sessions, promoted).state == "live"
