"""QLoRA never degrades silently, through a real Celery worker on this machine (no CUDA here, so
the missing-CUDA path is the real one): a qlora policy fails its run naming what is missing; with
`quantization_fallback: lora` the run trains plain LoRA and shows the fallback in its row, in
`flywheel runs list/show` and on the ops page (headless Chromium)."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.db.models import Adapter, AdapterVersion, Feedback, TrainingRun
from service.db.session import session_scope
from service.domain.policy import Policy
from service.wakeup import wake_run
from tests.helpers.browser import CHROMIUM, CHROMIUM_ARGS, require_chromium
from tests.helpers.cli import flywheel
from tests.helpers.data import seed_interactions
from tests.helpers.runs import wait_run
from tests.helpers.stack import ApiProcess, WorkerProcess, flywheel_env

pytestmark = [pytest.mark.slow]



@pytest.fixture(scope="module", autouse=True)
def _no_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: QLoRA would really run (the GPU proof covers it)")


@pytest.fixture(scope="module")
def env(db_url, broker_url, tiny_model, stack_root, tmp_path_factory):
    policies = tmp_path_factory.mktemp("qlora-policies")  # runs carry their own policy
    return flywheel_env(database_url=db_url, broker_url=broker_url, vllm_urls="",
                        base_model=str(tiny_model), policy_dir=str(policies),
                        data_dir=str(stack_root / "qlora-data"),
                        artifact_dir=str(stack_root / "qlora-artifacts"), run_lease_s="30")


@pytest.fixture(scope="module")
def worker(env, stack_root):
    w = WorkerProcess(env=env, log=stack_root / "worker-qlora.log", name="wq").start()
    yield w
    w.stop()


def _qlora_run(db_sessions, tenant: str, alias: str, fallback: str) -> uuid.UUID:
    """A pending run over 12 thumbs-up on `alias`, with a qlora policy."""
    policy = Policy.model_validate({
        "training": {"method": "sft", "max_steps": 2, "batch_size": 4, "quantization": "qlora",
                     "quantization_fallback": fallback, "checkpoint_every_steps": 1},
        "dataset": {"heldout_fraction": 0.25, "min_examples": 2},
        "gate": {"min_preference_accuracy": 0.0, "max_nll_regression": 100.0},
    })
    ids = seed_interactions(db_sessions, tenant, alias, None, 12, answer="Order {i} ships today.")
    with session_scope(db_sessions) as s:
        adapter = s.scalars(select(Adapter).where(Adapter.tenant_id == tenant,
                                                  Adapter.alias == alias)).one()
        for i, iid in enumerate(ids):
            s.add(Feedback(interaction_id=uuid.UUID(iid), tenant_id=tenant, adapter_id=adapter.id,
                           rater_id=f"r{i % 3}", rating="up"))
        s.flush()
        top = s.scalar(select(func.max(Feedback.seq)).where(Feedback.adapter_id == adapter.id))
        run = TrainingRun(tenant_id=tenant, adapter_id=adapter.id, state="pending",
                          trigger={"test": "qlora"}, policy=policy.model_dump(mode="json"),
                          feedback_seq_from=0, feedback_seq_to=top)
        s.add(run)
        s.flush()
        return run.id


def _cli(env, *args: str) -> subprocess.CompletedProcess:
    return flywheel({**env, "COLUMNS": "250"}, *args)


def _versions(db_sessions, run_id) -> list[AdapterVersion]:
    with db_sessions() as s:
        return list(s.scalars(select(AdapterVersion).where(AdapterVersion.run_id == run_id)))


def test_qlora_without_cuda_fails_the_run_or_shows_the_fallback(
        env, worker, broker_url, db_sessions, make_alias, make_key, tenant, stack_root):
    strict = _qlora_run(db_sessions, tenant, make_alias(tenant, "strict-bot"), "fail")
    lenient = _qlora_run(db_sessions, tenant, make_alias(tenant, "lenient-bot"), "lora")
    assert wake_run(broker_url, strict) and wake_run(broker_url, lenient)

    # The default: the run fails, naming what is missing and how to allow LoRA; nothing trained.
    run = wait_run(db_sessions, strict, {"failed"}, timeout=300, log=worker.log)
    assert "cannot train QLoRA" in run.failure_reason and "CUDA is not available" in run.failure_reason
    assert "quantization_fallback: lora" in run.failure_reason
    assert run.metrics["quantization"]["used"] is None and not _versions(db_sessions, strict)

    # fallback: lora: plain LoRA trains, and the run says so to the end of the gate.
    run = wait_run(db_sessions, lenient, {"awaiting_approval", "rejected"}, timeout=400,
                   log=worker.log)
    q = run.metrics["quantization"]
    assert (q["requested"], q["used"], q["fallback"]) == ("qlora", "none", True)
    assert "CUDA is not available" in q["reason"] and "gate" in run.metrics
    [version] = _versions(db_sessions, lenient)
    lineage = json.loads((Path(version.artifact_path) / "lineage.json").read_text())
    assert lineage["training"]["quantization"] == "none"
    assert "trained plain LoRA" in lineage["training"]["quantization_reason"]

    # The CLI.
    listing = _cli(env, "runs", "list", "--tenant", tenant)
    assert listing.returncode == 0, listing.stderr
    lines = {line for line in listing.stdout.splitlines() if str(lenient) in line}
    assert lines and "LoRA fallback" in lines.pop()
    shown = _cli(env, "runs", "show", str(lenient))
    assert shown.returncode == 0 and "qlora -> LoRA fallback" in shown.stdout
    assert "CUDA is not available" in shown.stdout
    failed = _cli(env, "runs", "show", str(strict))
    assert "qlora unavailable" in failed.stdout and "cannot train QLoRA" in failed.stdout

    # The ops page.
    _ops_page_shows_it(env, stack_root, make_key(tenant, "ops"), lenient, strict)


def _ops_page_shows_it(env, stack_root, ops_key: str, lenient: uuid.UUID, strict: uuid.UUID):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    api = ApiProcess(env=env, log=stack_root / "api-qlora.log").start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                         args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.set_default_timeout(20_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{api.url}/ops")
            page.get_by_label("Ops API key").fill(ops_key)
            page.get_by_role("button", name="Sign in").click()
            row = page.locator(f'[data-testid="run-row"][data-run-id="{lenient}"]')
            expect(row.get_by_test_id("run-quant-fallback")).to_have_text("QLoRA → LoRA fallback")
            failed_row = page.locator(f'[data-testid="run-row"][data-run-id="{strict}"]')
            expect(failed_row.get_by_test_id("run-quant")).to_have_text("QLoRA unavailable")
            row.get_by_test_id("open-run").click()
            fact = page.get_by_test_id("run-quantization")
            expect(fact).to_contain_text("plain LoRA (fallback from QLoRA)")
            expect(fact).to_contain_text("CUDA is not available")
            # The training job it ran as (workers/trainer/): backend, attempt, host; no path.
            job = page.get_by_test_id("run-training-job")
            expect(job).to_have_text(re.compile(r"^local, attempt 1, on \S+$"))
            assert not errors, errors
            browser.close()
    finally:
        api.stop()

