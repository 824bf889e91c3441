"""Feedback imports through the `flywheel import` CLI and the domain functions, against the
session's real Postgres: each format crosses the trigger, a second import adds nothing,
malformed records are reported by line or index, and imported ratings stay apart from served
ones where that matters (the watch window) and count where they should (trigger, dataset)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.db import repositories as repo
from service.db.models import (
    Adapter,
    AuditEvent,
    Feedback,
    FeedbackImport,
    Interaction,
    TrainingRun,
)
from service.db.session import session_scope
from service.domain.policy import PolicyStore
from service.imports import RatingRule, parse_file, store
from tests.helpers.cli import flywheel
from tests.helpers.data import seed_interactions
from tests.helpers.stack import REPO, flywheel_env

DATA = REPO / "tests" / "data" / "imports"
SAMPLES = {"openwebui": "openwebui-feedback-export.json", "langfuse": "langfuse-traces.json",
           "jsonl": "chats.jsonl"}
REPORTED = {"openwebui": ["item 12 (id "], "langfuse": ["trace 12 (id "],
            "jsonl": ["line 5: not valid JSON", "line 13: messages: the last message"]}


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("import-policies")
    # Each sample has 10 importable records: the import alone crosses the trigger.
    (d / "default.yaml").write_text("trigger: {min_new_ratings: 10}\n")
    return d


@pytest.fixture(scope="module")
def cli_env(db_url, broker_url, stack_root, policies):
    """The CLI's environment with this module's policies (in place of tests/helpers/cli.py's)."""
    env = flywheel_env(database_url=db_url, broker_url=broker_url, policy_dir=str(policies),
                       data_dir=str(stack_root / "cli-imports"), vllm_urls="http://127.0.0.1:9")
    return {**env, "COLUMNS": "200"}


def _adapter(db_sessions, tenant, alias) -> Adapter:
    with db_sessions() as s:
        return s.scalars(select(Adapter).where(Adapter.tenant_id == tenant,
                                               Adapter.alias == alias)).one()


@pytest.mark.parametrize("source", sorted(SAMPLES))
def test_import_crosses_the_trigger_once_and_a_second_import_adds_nothing(
        source, cli_env, db_sessions, make_alias, tenant):
    alias = make_alias(tenant)
    path = DATA / SAMPLES[source]
    r = flywheel(cli_env, "import", source, str(path), "--alias", alias, "--tenant", tenant)
    # Exit 1: some records were malformed (reported), the others imported.
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "imported 10," in r.stdout and "1 no rating" in r.stdout
    for needle in REPORTED[source]:
        assert needle in r.stderr
    assert "crossed the trigger" in r.stdout

    adapter = _adapter(db_sessions, tenant, alias)
    with db_sessions() as s:
        rows = list(s.scalars(select(Interaction).where(Interaction.adapter_id == adapter.id)))
        feedback = list(s.scalars(select(Feedback).where(Feedback.adapter_id == adapter.id)))
        [job] = s.scalars(select(FeedbackImport).where(FeedbackImport.adapter_id == adapter.id))
        [run] = s.scalars(select(TrainingRun).where(TrainingRun.adapter_id == adapter.id))
    assert len(rows) == len(feedback) == 10
    assert {i.source for i in rows} == {source} and {i.import_id for i in rows} == {job.id}
    # Told apart from served interactions: no version of the alias answered them.
    assert {i.served_model for i in rows} == {f"import:{source}"}
    assert {i.version_id for i in rows} == {None} and {f.version_id for f in feedback} == {None}
    # The source's ids and times are kept (the samples are from 2025).
    parsed = parse_file(source, path.read_bytes())
    assert {i.source_id for i in rows} == {rec.source_id for _, rec in parsed.records}
    assert all(i.created_at.year == 2025 for i in rows)
    assert sorted(f.rating for f in feedback) == ["down"] * 4 + ["up"] * 6
    # The job row: every record accounted for; the run the import started.
    assert (job.status, job.total, job.imported, job.skipped) == ("done", len(parsed.items), 10, 1)
    assert job.errors == len(REPORTED[source]) == len(job.error_samples)
    assert job.skipped_reasons == {"no_rating": 1} and job.file_sha256 == parsed.sha256
    assert job.run_id == run.id and job.file_name == path.name and job.requested_by == "cli"
    assert run.state == "pending" and run.trigger["new_ratings"] == 10

    again = flywheel(cli_env, "import", source, str(path), "--alias", alias, "--tenant", tenant)
    assert again.returncode == 1 and "imported 0," in again.stdout
    assert "10 already imported" in again.stdout
    with db_sessions() as s:
        assert s.scalar(select(func.count()).select_from(Interaction)
                        .where(Interaction.adapter_id == adapter.id)) == 10
        assert s.scalar(select(func.count()).select_from(Feedback)
                        .where(Feedback.adapter_id == adapter.id)) == 10
        assert len(list(s.scalars(select(TrainingRun).where(TrainingRun.adapter_id == adapter.id)))) == 1
        actions = list(s.scalars(select(AuditEvent.action).where(AuditEvent.tenant_id == tenant)))
    assert actions.count("feedback.import") == 2 and actions.count("feedback.import.done") == 2

    listing = flywheel(cli_env, "imports", alias, "--tenant", tenant)
    assert listing.returncode == 0 and str(job.id) in listing.stdout


def test_dry_run_writes_nothing_and_bad_input_is_refused_whole(cli_env, db_sessions, make_alias,
                                                               tenant, tmp_path):
    alias = make_alias(tenant)
    r = flywheel(cli_env, "import", "jsonl", str(DATA / "chats.jsonl"), "--alias", alias,
                 "--tenant", tenant, "--dry-run")
    assert r.returncode == 1 and "would import 10" in r.stdout and "nothing was written" in r.stdout
    assert "line 5: not valid JSON" in r.stderr
    bad = tmp_path / "export.json"
    bad.write_text('{"not": "an export"}')
    r = flywheel(cli_env, "import", "openwebui", str(bad), "--alias", alias, "--tenant", tenant)
    assert r.returncode == 2 and "not an Open WebUI feedback export" in r.stderr
    r = flywheel(cli_env, "import", "jsonl", str(DATA / "chats.jsonl"), "--alias", "nobody",
                 "--tenant", tenant)
    assert r.returncode == 2 and "no alias 'nobody'" in r.stderr
    r = flywheel(cli_env, "import", "jsonl", str(DATA / "chats.jsonl"), "--alias", alias,
                 "--tenant", tenant, "--up-min", "0", "--down-max", "1")
    assert r.returncode == 2 and "below up_min" in (r.stdout + r.stderr)
    adapter = _adapter(db_sessions, tenant, alias)
    with db_sessions() as s:
        assert s.scalar(select(func.count()).select_from(Interaction)
                        .where(Interaction.adapter_id == adapter.id)) == 0
        assert not list(s.scalars(select(FeedbackImport).where(FeedbackImport.adapter_id == adapter.id)))


def test_a_record_the_database_refuses_is_reported_alone(db_sessions, make_alias, tenant):
    """One record's interaction + feedback share a savepoint: a refused record leaves nothing
    behind and the records around it are imported."""
    alias = make_alias(tenant)
    parsed = parse_file("jsonl", (DATA / "chats.jsonl").read_bytes())
    # A rater id over the column's 200 characters is cut; a rating the column cannot hold is
    # refused by the database (the parser never makes one: forced here).
    where, first = parsed.records[0]
    object.__setattr__(first, "rating", "x" * 20)
    policy = PolicyStore(Path("policies")).for_alias(alias, tenant)
    with session_scope(db_sessions) as s:
        job_id = store.create_job(s, _adapter(db_sessions, tenant, alias), parsed, actor="test",
                                  rule=RatingRule(), file_name=None).id
    job = store.run_job(db_sessions, job_id, parsed, policy, batch_size=4)
    assert (job.status, job.imported, job.errors) == ("done", 9, 3)
    assert any(e["where"] == where and "the database refused it" in e["reason"]
               for e in job.error_samples)
    with db_sessions() as s:
        ids = set(s.scalars(select(Interaction.source_id).where(Interaction.import_id == job_id)))
    assert first.source_id not in ids and len(ids) == 9


def test_imported_ratings_stay_out_of_the_base_models_watch_rate(db_sessions, make_alias, tenant):
    from workers.stages.watch import _rates

    alias = make_alias(tenant)
    adapter = _adapter(db_sessions, tenant, alias)
    with session_scope(db_sessions) as s:
        key = repo.create_api_key(s, tenant_id=tenant, role="product", key_hash=uuid.uuid4().hex,
                                  prefix="fw_x")
        key_id = key.id
    served = seed_interactions(db_sessions, tenant, alias, key_id, 2)
    with session_scope(db_sessions) as s:
        for iid in served:
            s.add(Feedback(interaction_id=uuid.UUID(iid), tenant_id=tenant, adapter_id=adapter.id,
                           rater_id="r", rating="down"))
    parsed = parse_file("jsonl", (DATA / "chats.jsonl").read_bytes())
    policy = PolicyStore(Path("policies")).for_alias(alias, tenant)
    with session_scope(db_sessions) as s:
        job_id = store.create_job(s, adapter, parsed, actor="test", rule=RatingRule(),
                                  file_name=None).id
    store.run_job(db_sessions, job_id, parsed, policy)
    with db_sessions() as s:
        assert _rates(s, adapter.id, None, None) == (0, 2)  # the base: served ratings only
        # ... while the trigger's buffer counts both.
        assert s.scalar(select(func.count()).select_from(Feedback).where(
            Feedback.adapter_id == adapter.id, Feedback.seq > 0)) == 12


def test_lineage_names_the_import_of_each_example(db_sessions, make_alias, tenant):
    alias = make_alias(tenant)
    adapter = _adapter(db_sessions, tenant, alias)
    served = seed_interactions(db_sessions, tenant, alias, None, 1)
    parsed = parse_file("langfuse", (DATA / "langfuse-traces.json").read_bytes())
    with session_scope(db_sessions) as s:
        job_id = store.create_job(s, adapter, parsed, actor="test", rule=RatingRule(),
                                  file_name=None).id
    store.run_job(db_sessions, job_id, parsed, PolicyStore(Path("policies")).for_alias(alias, tenant))
    with db_sessions() as s:
        imported = [str(i) for i in s.scalars(select(Interaction.id).where(Interaction.import_id == job_id))]
        [entry] = store.lineage(s, imported + served, imported[:2])
    assert entry["import_id"] == str(job_id) and entry["source"] == "langfuse"
    assert (entry["train"], entry["heldout"]) == (8, 2)
    assert entry["file_sha256"] == parsed.sha256
    assert sorted(entry["train_ids"] + entry["heldout_ids"]) == sorted(imported)
