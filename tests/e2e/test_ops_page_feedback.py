"""The ops page's feedback panels in real headless Chromium: an import through the API shows its
counts, skip reasons, error samples and the run it started; a running import is followed by the
refresh loop; the AI judge's panel shows its model, budget, ratings apart from the humans', its
agreement with them (recomputed here from the rows inserted) and its sweeps; the thumbs-up chart
draws the judge as a series of its own, not as a version. No vLLM and no worker: the panels only
read the database."""

from __future__ import annotations

import math
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update

from service.db import repositories as repo
from service.db.models import Adapter, Feedback, FeedbackImport, Interaction, JudgeSweep
from service.db.session import session_scope
from tests.helpers.auth import bearer
from tests.helpers.data import wait_import
from tests.helpers.stack import REPO, ApiProcess, flywheel_env

SCREENSHOT = Path("/tmp/ops-feedback.png")

# chats.jsonl: 13 lines; line 5 is malformed JSON and line 13 has no answer (2 errors), line 12
# rates 0.5 (skipped: no_rating); the other 10 are imported, which reaches this trigger.
SAMPLE = REPO / "tests" / "data" / "imports" / "chats.jsonl"
POLICY = "trigger: {min_new_ratings: 10}\n"
JUDGE_MODEL = "judge-m"
STOPPED = "the judge timed out twice in a row; the rest waits for the next sweep"
JUDGE_COLOR = "#9333ea"  # ops.js JUDGE_COLOR


@pytest.fixture(scope="module")
def feedback_api(db_url, broker_url, stack_root, tmp_path_factory):
    """A real `flywheel api` on the session's Postgres and Redis, with its own policy dir."""
    policies = tmp_path_factory.mktemp("ops-feedback-policies")
    (policies / "default.yaml").write_text(POLICY)
    env = flywheel_env(database_url=db_url, broker_url=broker_url, vllm_urls="",
                       policy_dir=str(policies), data_dir=str(stack_root / "ops-feedback-data"))
    proc = ApiProcess(env=env, log=stack_root / "api-ops-feedback.log").start()
    yield proc, policies
    proc.stop()


def _pct(x: float) -> str:
    """As the page writes a share (Math.round of a percentage)."""
    return f"{math.floor(x * 100 + 0.5)}%"


def _expected_agreement(pairs: list[tuple[str, str]]) -> dict:
    """Share agreeing, its 95% Wilson interval and Cohen's kappa, computed here on their own."""
    n = len(pairs)
    agree = sum(j == h for j, h in pairs)
    p, z = agree / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    pj = sum(j == "up" for j, _ in pairs) / n
    ph = sum(h == "up" for _, h in pairs) / n
    chance = pj * ph + (1 - pj) * (1 - ph)
    return {"agree": agree, "pairs": n, "rate": p, "lo": max(0.0, centre - half),
            "hi": min(1.0, centre + half), "kappa": (p - chance) / (1 - chance)}


def test_imports_and_ai_judge_panels(feedback_api, page, make_key, make_alias, tenant, db_sessions):
    from playwright.sync_api import expect

    api, policies = feedback_api
    ops = make_key(tenant, "ops")
    alias = make_alias(tenant)
    # A shared alias file naming this tenant turns the judge on (url and model both set).
    (policies / f"{alias}.yaml").write_text(
        f"tenants: [{tenant}]\n"
        f'judge: {{url: "http://judge.invalid:8000/v1", model: {JUDGE_MODEL}}}\n')

    with httpx.Client(base_url=api.url, timeout=60) as c:
        r = c.post(f"/v1/adapters/{alias}/imports", headers=bearer(ops), content=SAMPLE.read_bytes(),
                   params={"source": "jsonl", "file_name": SAMPLE.name})
        assert r.status_code == 202, r.text
        job = wait_import(c, alias, ops, r.json()["id"])
    assert job["status"] == "done", job
    assert (job["total"], job["imported"], job["skipped"], job["errors"]) == (13, 10, 1, 2), job
    assert job["run_id"], job  # 10 new ratings reach the trigger: a run waits (no worker here)
    [broken] = [e for e in job["error_samples"] if e["where"] == "line 5"]

    # The judge's rows, as workers.judge writes them: feedback with source "judge" (some on answers
    # humans rated too, so agreement has pairs; two a day-old bucket back, so its line has two
    # points), a version with judge ratings of its own, and two sweeps.
    now = datetime.now(UTC)
    pairs: list[tuple[str, str]] = []  # (judge, human) on the same answer
    with session_scope(db_sessions) as s:
        adapter = s.scalars(select(Adapter).where(Adapter.tenant_id == tenant,
                                                  Adapter.alias == alias)).one()
        rated = s.execute(select(Interaction.id, Feedback.rating)
                          .join(Feedback, Feedback.interaction_id == Interaction.id)
                          .where(Interaction.import_id == uuid.UUID(job["id"]))
                          .order_by(Interaction.source_id)).all()
        for (iid, human), verdict, hours in zip(rated, ["up", "up", "up", "up", "down"],
                                                [2, 2, 0, 0, 0], strict=False):
            s.add(Feedback(interaction_id=iid, tenant_id=tenant, adapter_id=adapter.id,
                           rater_id="judge:base", rating=verdict, source="judge",
                           created_at=now - timedelta(hours=hours)))
            pairs.append((verdict, human))
        version = repo.create_version(s, adapter, artifact_path="/nowhere/v1", sha256="0" * 64,
                                      parent_version_id=None, run_id=None, lineage={})
        for n, verdict in enumerate(["up", "up", "down"]):
            served = Interaction(tenant_id=tenant, alias=alias, adapter_id=adapter.id,
                                 version_id=version.id, served_model=version.lora_name,
                                 messages=[{"role": "user", "content": f"question {n}"}],
                                 response_text=f"answer {n}")
            s.add(served)
            s.flush()
            s.add(Feedback(interaction_id=served.id, tenant_id=tenant, adapter_id=adapter.id,
                           version_id=version.id, rater_id="judge:base", rating=verdict,
                           source="judge"))
            if verdict == "down":  # a human agrees on this one
                s.add(Feedback(interaction_id=served.id, tenant_id=tenant, adapter_id=adapter.id,
                               version_id=version.id, rater_id="user-1", rating="down"))
                pairs.append((verdict, "down"))
        s.add(JudgeSweep(tenant_id=tenant, adapter_id=adapter.id, model=JUDGE_MODEL, mode="absolute",
                         attempted=9, rated=7, up=5, down=2, calibration=5, skipped=2,
                         skipped_reasons={"timeout": 2}, stopped=STOPPED,
                         started_at=now - timedelta(minutes=10), finished_at=now - timedelta(minutes=9)))
        s.add(JudgeSweep(tenant_id=tenant, adapter_id=adapter.id, model=JUDGE_MODEL, mode="absolute",
                         attempted=20, rated=19, up=12, down=7, calibration=2, skipped=1,
                         skipped_reasons={"too_long": 1}, stopped=None,
                         started_at=now - timedelta(hours=3),
                         finished_at=now - timedelta(hours=3) + timedelta(seconds=95)))
        lora_name = version.lora_name
    want = _expected_agreement(pairs)
    assert (want["agree"], want["pairs"]) == (5, 6)  # the rows above: one disagreement
    human_up = sum(1 for _, h in rated if h == "up")
    human_down = sum(1 for _, h in rated if h == "down") + 1  # + user-1 on v1

    page.goto(f"{api.url}/ops")
    page.get_by_label("Ops API key").fill(ops)
    page.get_by_role("button", name="Sign in").click()
    page.locator(f'[data-testid="alias-row"][data-alias="{alias}"]').get_by_role(
        "button", name=re.compile("^Details")).click()
    expect(page.locator("#alias-detail-title")).to_contain_text(alias)

    # Imports: the counts, the skip reason, the malformed line with where it is, the run.
    imports = page.get_by_test_id("imports-section")
    row = imports.locator(f'[data-testid="import-row"][data-import-id="{job["id"]}"]')
    expect(row).to_have_attribute("data-status", "done")
    expect(row.get_by_test_id("import-status")).to_have_text("done")
    expect(row.get_by_test_id("import-file")).to_contain_text(SAMPLE.name)
    expect(row.get_by_test_id("import-counts")).to_have_text("10 imported of 13")
    expect(row.get_by_test_id("import-skipped")).to_contain_text("1")
    expect(row.get_by_test_id("import-skipped").locator('[data-reason="no_rating"]')).to_have_text("no rating 1")
    expect(row.get_by_test_id("import-errors")).to_contain_text("2")
    expect(row.get_by_test_id("import-error-sample")).to_have_count(2)
    expect(row.get_by_test_id("import-error-sample").first).to_have_text(
        f"line 5: {broken['reason']}")
    expect(row.get_by_test_id("import-failure")).to_have_count(0)

    # AI judge: on, its model and endpoint (no path, no credentials), the hour's budget.
    judge = page.get_by_test_id("judge-panel")
    expect(judge.get_by_test_id("judge-model")).to_have_text(JUDGE_MODEL)
    expect(judge.get_by_test_id("judge-endpoint")).to_have_text("http://judge.invalid:8000")
    expect(judge.get_by_test_id("judge-budget")).to_contain_text("9 of 60 answers sent")
    expect(judge.get_by_test_id("judge-budget").get_by_role("progressbar")).to_have_attribute(
        "aria-valuenow", "9")
    # Ratings by source, side by side.
    ratings = judge.get_by_test_id("judge-ratings")
    judge_up = sum(1 for j, _ in pairs if j == "up") + 2  # + the two judge-only ups on v1
    judge_down = sum(1 for j, _ in pairs if j == "down")
    expect(ratings.locator("tr", has_text="Thumbs up")).to_have_text(
        re.compile(rf"Thumbs up\s*{human_up}\s*{judge_up}"))
    expect(ratings.locator("tr", has_text="Thumbs down")).to_have_text(
        re.compile(rf"Thumbs down\s*{human_down}\s*{judge_down}"))
    # Agreement, as recomputed above, with the caution a handful of pairs calls for.
    agreement = judge.get_by_test_id("judge-agreement")
    expect(agreement).to_have_text(
        f"Agrees on {want['agree']} of {want['pairs']} answers both rated ({_pct(want['rate'])}, "
        f"95% interval {_pct(want['lo'])}–{_pct(want['hi'])}), kappa {want['kappa']:.2f}.")
    expect(judge.get_by_test_id("judge-caution")).to_contain_text("Too few to trust")
    expect(judge.get_by_test_id("judge-skips").locator('[data-reason="timeout"]')).to_have_text("timeout 2")
    expect(judge.get_by_test_id("judge-skips").locator('[data-reason="too_long"]')).to_have_text("too long 1")
    sweeps = judge.get_by_test_id("judge-sweep-row")
    expect(sweeps).to_have_count(2)
    expect(sweeps.first.get_by_test_id("judge-stopped")).to_have_text(f"stopped: {STOPPED}")
    expect(sweeps.first).to_contain_text("7 (5 / 2)")
    expect(sweeps.nth(1)).to_contain_text("finished in 1 min 35 s")

    # The versions table keeps the judge's counts apart from the humans'.
    vrow = page.get_by_test_id("version-row").filter(has_text=lora_name)
    expect(vrow.get_by_test_id("version-judge-up")).to_have_text("AI judge 2")
    expect(vrow.get_by_test_id("version-judge-down")).to_have_text("AI judge 1")
    expect(vrow.locator("td").nth(1)).to_have_text("0AI judge 2")  # human ups, then the judge's
    expect(vrow.locator("td").nth(3)).to_have_text("0%")  # the rate is the humans' alone (0 of 1)
    # The chart: the judge is its own dashed series labelled "AI judge", not a version.
    chart = page.get_by_test_id("thumbs-chart")
    legend = chart.locator("ul.legend li")
    expect(legend).to_have_count(3)
    expect(legend.last).to_have_text("AI judge")  # drawn last, on top
    assert sorted(legend.all_inner_texts()) == sorted(["import:jsonl", lora_name, "AI judge"])
    expect(chart.locator("ul.legend li", has_text="AI judge").locator(".swatch.dashed")).to_have_count(1)
    expect(chart.locator(f'polyline[stroke="{JUDGE_COLOR}"][stroke-dasharray]')).to_have_count(1)
    expect(chart.locator(f'circle[stroke="{JUDGE_COLOR}"]')).to_have_count(2)

    # A running import (rows as the API process writes them) is followed by the refresh loop.
    running = uuid.uuid4()
    with session_scope(db_sessions) as s:
        s.add(FeedbackImport(id=running, tenant_id=tenant, adapter_id=adapter.id, source="openwebui",
                             status="running", requested_by="key:test", file_name="feedback-export.json",
                             file_bytes=48_000, total=40, imported=12, skipped=2, errors=1,
                             skipped_reasons={"duplicate": 2},
                             error_samples=[{"where": "item 7 (id m-7)", "reason": "no assistant answer"}],
                             started_at=now))
    live = imports.locator(f'[data-testid="import-row"][data-import-id="{running}"]')
    expect(live).to_have_attribute("data-status", "running")
    bar = live.get_by_test_id("import-counts").get_by_role("progressbar")
    expect(bar).to_have_attribute("aria-valuenow", "15")
    expect(bar).to_have_attribute("aria-valuemax", "40")
    expect(live.get_by_test_id("import-counts")).to_contain_text("15 of 40 records read")
    expect(imports.get_by_test_id("import-row").first).to_have_attribute("data-import-id", str(running))
    with session_scope(db_sessions) as s:
        s.execute(update(FeedbackImport).where(FeedbackImport.id == running).values(
            status="failed", imported=30, failure_reason="the database went away after 33 of 40 records",
            finished_at=datetime.now(UTC)))
    expect(live).to_have_attribute("data-status", "failed")
    expect(live.get_by_test_id("import-failure")).to_have_text(
        "the database went away after 33 of 40 records")
    expect(live.get_by_role("progressbar")).to_have_count(0)
    expect(live.get_by_test_id("import-run")).to_have_text("none")

    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    print(f"ops feedback screenshot: {SCREENSHOT}")

    # The import's run opens in the report, from the keyboard.
    link = row.get_by_test_id("import-run-link")
    link.focus()
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("run-report")).to_have_attribute("data-run-id", job["run_id"])

    # Judge off: one line naming the policy fields that turn it on.
    (policies / f"{alias}.yaml").write_text(f"tenants: [{tenant}]\n")
    off = judge.get_by_test_id("judge-off")
    expect(off).to_contain_text("No AI judge is configured")
    expect(off).to_contain_text("judge.url")
    expect(off).to_contain_text("judge.model")
    expect(judge.get_by_test_id("judge-sweep-row")).to_have_count(0)

    assert not page.problems, page.problems
