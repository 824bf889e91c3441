"""The AI judge's sweep: rate a sample of an alias's unrated answers within its hourly budget.

Beat sends `flywheel.judge` every FLYWHEEL_JUDGE_INTERVAL_S. For each alias whose policy names a
judge, one sweep (one at a time per alias: a Postgres advisory lock) reads how much of the
rolling hour's budget is left, samples answers nobody rated (plus a calibration share that
humans rated, which is what measures agreement), asks the judge, and stores each verdict as
feedback with source `judge` and rater `judge:<model>`. A sweep is bounded in time
(FLYWHEEL_JUDGE_SWEEP_MAX_S) and stops at the first sign the judge is down, so it never holds
up the trigger sweep and the watch that share its queue. Every sweep leaves a `judge_sweeps` row
with what it sent, rated and skipped, and why.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import func, select, text
from sqlalchemy.orm import sessionmaker

from service.db import repositories as repo
from service.db.models import FEEDBACK_SOURCE_JUDGE, JUDGE_RATER_PREFIX, Adapter, JudgeSweep
from service.db.session import session_scope
from service.domain.judge_stats import USED_LAST_HOUR
from service.domain.policy import JudgePolicy
from workers.judge_client import JudgeClient, JudgeFailed, Rating

log = logging.getLogger(__name__)

# Answers a judge can rate: complete ones (not pending, dropped mid-stream or failed).
_RATEABLE = "coalesce(i.finish_reason, 'stop') NOT IN ('pending', 'disconnected', 'error', 'abort')"

_UNRATED = text(f"""
SELECT i.id, i.messages, i.response_text, i.response_tool_calls, i.version_id
FROM interactions i
WHERE i.adapter_id = :adapter_id AND i.tenant_id = :tenant_id AND {_RATEABLE}
  AND i.created_at > now() - make_interval(secs => :lookback_s)
  AND i.created_at < now() - make_interval(secs => :min_age_s)
  AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.interaction_id = i.id)
ORDER BY random() LIMIT :limit
""")

# Rated by a human, not yet by the judge: the calibration sample (agreement).
_HUMAN_RATED = text(f"""
SELECT i.id, i.messages, i.response_text, i.response_tool_calls, i.version_id
FROM interactions i
WHERE i.adapter_id = :adapter_id AND i.tenant_id = :tenant_id AND {_RATEABLE}
  AND i.created_at > now() - make_interval(secs => :lookback_s)
  AND EXISTS (SELECT 1 FROM feedback f WHERE f.interaction_id = i.id AND f.source = 'human')
  AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.interaction_id = i.id AND f.source = 'judge')
ORDER BY random() LIMIT :limit
""")

# A human never rates as judge:* (the API refuses it), so a conflict is a racing judge.
_STORE = text("""
INSERT INTO feedback (id, interaction_id, tenant_id, adapter_id, version_id, rater_id, rating,
                      comment, source, created_at, updated_at)
VALUES (:id, :interaction_id, :tenant_id, :adapter_id, :version_id, :rater_id, :rating,
        :comment, :source, now(), now())
ON CONFLICT (interaction_id, rater_id) DO NOTHING
""")


@dataclass
class Candidate:
    """One answer to rate."""

    id: uuid.UUID
    messages: list[dict]
    answer: str
    version_id: uuid.UUID | None
    calibration: bool


@dataclass
class SweepResult:
    """What one sweep of one alias did (also its judge_sweeps row)."""

    alias: str
    attempted: int = 0
    rated: int = 0
    up: int = 0
    down: int = 0
    calibration: int = 0
    skipped: Counter = field(default_factory=Counter)
    stopped: str | None = None
    budget_left: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe form (the Celery task's result)."""
        return {"alias": self.alias, "attempted": self.attempted, "rated": self.rated,
                "up": self.up, "down": self.down, "calibration": self.calibration,
                "skipped": dict(self.skipped), "stopped": self.stopped,
                "budget_left": self.budget_left}


def _answer_text(row) -> str:
    if row.response_text:
        return row.response_text
    if row.response_tool_calls:

        return f"[tool calls] {json.dumps(row.response_tool_calls)}"
    return ""


def _candidates(s, query, adapter: Adapter, policy: JudgePolicy, limit: int,
                calibration: bool) -> list[Candidate]:
    if limit <= 0:
        return []
    rows = s.execute(query, {"adapter_id": adapter.id, "tenant_id": adapter.tenant_id,
                             "lookback_s": policy.lookback_hours * 3600,
                             "min_age_s": policy.min_age_s, "limit": limit})
    return [Candidate(r.id, r.messages, answer, r.version_id, calibration)
            for r in rows if (answer := _answer_text(r))]


def split_budget(n: int, share: float, rng: random.Random) -> int:
    """How many of n go to calibration: share of n, the fraction rounded at random so a small
    per-sweep n still calibrates at the asked rate on average."""
    exact = n * share
    return min(n, math.floor(exact) + (1 if rng.random() < exact - math.floor(exact) else 0))


def sample(s, adapter: Adapter, policy: JudgePolicy, n: int, rng: random.Random
           ) -> list[Candidate]:
    """Up to n answers: the calibration share from human-rated ones, the rest unrated; either
    side's shortfall is filled from the other. Relative mode draws a wider pool so answers to
    the same prompt can be ranked together."""
    want_cal = split_budget(n, policy.calibration_share, rng)
    pool = n * 4 if policy.mode == "relative" else n
    cal = _candidates(s, _HUMAN_RATED, adapter, policy, want_cal, True)
    unrated = _candidates(s, _UNRATED, adapter, policy, max(pool, n - len(cal)), False)
    if policy.mode == "relative":
        unrated = _prefer_shared_prompts(unrated)
    unrated = unrated[:n - len(cal)]
    # Too few unrated: spend the rest on calibration, if the policy calibrates at all.
    if len(cal) + len(unrated) < n and len(cal) == want_cal and policy.calibration_share > 0:
        cal = _candidates(s, _HUMAN_RATED, adapter, policy, n - len(unrated), True)
    return cal + unrated


def _prompt_key(messages: list[dict]) -> str:

    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def _by_prompt(items: list[Candidate]) -> list[list[Candidate]]:
    """The items grouped by conversation, in first-seen order."""
    groups: dict[str, list[Candidate]] = {}
    for c in items:
        groups.setdefault(_prompt_key(c.messages), []).append(c)
    return list(groups.values())


def _prefer_shared_prompts(items: list[Candidate]) -> list[Candidate]:
    """Answers whose prompt has other answers in the pool first (they can be ranked)."""
    groups = _by_prompt(items)
    return [c for g in groups if len(g) > 1 for c in g] + [c for g in groups if len(g) == 1 for c in g]


def batches(items: list[Candidate], policy: JudgePolicy) -> list[list[Candidate]]:
    """One call's worth each: single answers (absolute), or up to group_size answers sharing a
    prompt (relative; a prompt with one answer is rated alone)."""
    if policy.mode == "absolute":
        return [[c] for c in items]
    size = policy.group_size
    return [g[i:i + size] for g in _by_prompt(items) for i in range(0, len(g), size)]


def _ask(client: JudgeClient, batch: list[Candidate]) -> list[Rating]:
    if len(batch) == 1:
        return [client.rate_one(batch[0].messages, batch[0].answer)]
    return client.rank_group(batch[0].messages, [c.answer for c in batch])


def _store(s, adapter: Adapter, policy: JudgePolicy, batch: list[Candidate],
           ratings: list[Rating]) -> None:
    rater = f"{JUDGE_RATER_PREFIX}{policy.model}"[:200]
    for c, r in zip(batch, ratings, strict=True):
        comment = r.reason if r.score is None else f"score {r.score:.2f}: {r.reason}"
        s.execute(_STORE, {"id": uuid.uuid4(), "interaction_id": c.id,
                           "tenant_id": adapter.tenant_id, "adapter_id": adapter.id,
                           "version_id": c.version_id, "rater_id": rater, "rating": r.rating,
                           "comment": comment[:2000] or None, "source": FEEDBACK_SOURCE_JUDGE})


def _record(sessions: sessionmaker, sweep_id: uuid.UUID, res: SweepResult, *,
            done: bool) -> None:
    with session_scope(sessions) as s:
        row = repo.get_row(s, JudgeSweep, sweep_id)
        row.attempted, row.rated, row.up, row.down = res.attempted, res.rated, res.up, res.down
        row.calibration, row.skipped = res.calibration, sum(res.skipped.values())
        row.skipped_reasons, row.stopped = dict(res.skipped), res.stopped
        if done:
            row.finished_at = func.now()


def per_sweep_limit(policy: JudgePolicy, interval_s: float) -> int:
    """The budget spread over the hour's sweeps (at least one answer per sweep)."""
    return max(1, math.ceil(policy.budget_per_hour * interval_s / 3600))


def judge_alias(sessions: sessionmaker, adapter_id: uuid.UUID, policy: JudgePolicy, *,
                limit: int, deadline: float | None = None, api_key: str | None = None,
                rng: random.Random | None = None,
                transport: httpx.BaseTransport | None = None) -> SweepResult | None:
    """One sweep of one alias. None when another sweep holds the alias or the budget is spent
    (nothing is recorded then)."""
    rng = rng or random.Random()
    with sessions() as lock_session:
        # Session-level advisory lock on its own connection: released if this process dies.
        got = lock_session.execute(text("SELECT pg_try_advisory_lock(hashtextextended(:k, 0))"),
                                   {"k": f"flywheel.judge:{adapter_id}"}).scalar()
        if not got:
            return None
        try:
            return _sweep(sessions, adapter_id, policy, limit, deadline, api_key, rng, transport)
        finally:
            lock_session.execute(text("SELECT pg_advisory_unlock(hashtextextended(:k, 0))"),
                                 {"k": f"flywheel.judge:{adapter_id}"})
            lock_session.commit()


def _sweep(sessions, adapter_id, policy, limit, deadline, api_key, rng, transport):
    with session_scope(sessions) as s:
        adapter = s.get(Adapter, adapter_id)
        used = int(s.execute(USED_LAST_HOUR, {"a": adapter_id}).scalar())
        left = policy.budget_per_hour - used
        n = min(left, limit)
        if n <= 0:
            return None
        items = sample(s, adapter, policy, n, rng)
        if not items:
            return None
        sweep = JudgeSweep(tenant_id=adapter.tenant_id, adapter_id=adapter.id,
                           model=policy.model, mode=policy.mode, skipped_reasons={})
        s.add(sweep)
        s.flush()
        sweep_id = sweep.id
        s.expunge(adapter)
    res = SweepResult(alias=adapter.alias, budget_left=left)
    with JudgeClient(policy, api_key, transport=transport) as client:
        for batch in batches(items, policy):
            if deadline is not None and time.monotonic() > deadline:
                res.stopped = "out of time for this sweep (FLYWHEEL_JUDGE_SWEEP_MAX_S)"
                break
            res.attempted += len(batch)
            try:
                ratings = _ask(client, batch)
            except JudgeFailed as exc:
                res.skipped[exc.reason] += len(batch)
                log.warning("judge %s skipped %d answer(s) of %s: %s (%s)", policy.model,
                            len(batch), adapter.alias, exc.reason, exc.detail[:300])
                if exc.unreachable:
                    res.stopped = f"judge {exc.reason} ({exc.detail}); the rest waits"
                    break
                continue
            finally:
                _record(sessions, sweep_id, res, done=False)
            with session_scope(sessions) as s:
                _store(s, adapter, policy, batch, ratings)
            for c, r in zip(batch, ratings, strict=True):
                res.rated += 1
                res.up += r.rating == "up"
                res.down += r.rating == "down"
                res.calibration += c.calibration
    res.budget_left = left - res.attempted
    _record(sessions, sweep_id, res, done=True)
    return res


def sweep_all(ctx) -> list[dict]:
    """The beat task's body: one sweep for every alias whose policy names a judge."""
    settings = ctx.settings
    deadline = time.monotonic() + settings.judge_sweep_max_s
    api_key = settings.judge_api_key.get_secret_value() if settings.judge_api_key else None
    with session_scope(ctx.sessions) as s:
        adapters = list(s.execute(select(Adapter.id, Adapter.alias, Adapter.tenant_id)))
    done = []
    for adapter_id, alias, tenant_id in adapters:
        policy = ctx.policies.for_alias(alias, tenant_id).judge
        if not policy.enabled or time.monotonic() > deadline:
            continue
        try:
            res = judge_alias(ctx.sessions, adapter_id, policy, deadline=deadline, api_key=api_key,
                              limit=per_sweep_limit(policy, settings.judge_interval_s))
        except Exception:  # noqa: BLE001 - one alias's failure must not stop the others
            log.exception("judge sweep of %s failed", alias)
            continue
        if res is not None:
            done.append(res.as_dict())
    return done
