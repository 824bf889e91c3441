"""Text that is not Unicode, and ids that try to collide, through the real API, Postgres, Redis
and vLLM: every bad field is a 422 naming it, and no caller's bad input fails another's request.

Fuzzers that generate only valid UTF-8 cannot produce a lone surrogate, so these bodies are
written by hand: JSON may escape one (`"\\ud800"`) and Python decodes it into a str that no
database, broker or log line can encode.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from sqlalchemy import func, select

from service.db.models import Feedback, Interaction
from tests.helpers.auth import bearer
from tests.helpers.data import api_key_id, seed_interactions
from tests.helpers.stack import api_with

pytestmark = pytest.mark.vllm

LONE = "\\ud800"  # as it appears in the JSON text: a high surrogate with no low half


def _raw(template: str) -> bytes:
    """A JSON body with LONE spliced in where the template says {LONE}."""
    return template.replace("{LONE}", LONE).encode()


def _post(client, path, key, body: bytes, method="POST"):
    return client.request(method, path, content=body,
                          headers={**bearer(key), "content-type": "application/json"})


def test_every_text_field_with_a_lone_surrogate_is_a_422_naming_it(client, make_key, make_alias,
                                                                   tenant, db_sessions):
    key, ops = make_key(tenant, "product"), make_key(tenant, "ops")
    alias = make_alias(tenant)
    chat = '{"model": "%s", "max_tokens": 2, %%s "messages": [{"role": "user", "content": %%s}]}' % alias
    cases = [
        ("/v1/chat/completions", key, chat % ("", '"hi {LONE} there"'), "messages.0.content"),
        ("/v1/chat/completions", key, chat % ('"user": "u{LONE}",', '"hi"'), "user"),
        ("/v1/chat/completions", key, chat % ('"metadata": {"k": ["ok", "{LONE}"]},', '"hi"'),
         "metadata.k.1"),
        ("/v1/chat/completions", key, chat % ('"x{LONE}y": 1,', '"hi"'), "x?y"),
        ("/v1/feedback", key, '{"interaction_id": "%s", "rating": "up", "rater_id": "r{LONE}"}'
         % uuid.uuid4(), "rater_id"),
        ("/v1/feedback", key, '{"interaction_id": "%s", "rating": "down", "correction": "{LONE}"}'
         % uuid.uuid4(), "correction"),
    ]
    with db_sessions() as s:
        before = s.scalar(select(func.count()).select_from(Interaction).where(
            Interaction.tenant_id == tenant))
    for path, k, body, field in cases:
        r = _post(client, path, k, _raw(body))
        assert r.status_code == 422, (path, field, r.status_code, r.text)
        err = r.json()["error"]
        assert err["param"] == field and err["code"] == "invalid_text", (field, err)
        assert "not valid Unicode" in err["message"] and "U+D800" in err["message"]
    # DELETE carries a body too (an export deletion's reason).
    r = _post(client, f"/v1/adapters/{alias}/exports/{uuid.uuid4()}", ops,
              _raw('{"reason": "gdpr {LONE}"}'), method="DELETE")
    assert r.status_code == 422 and r.json()["error"]["param"] == "reason", r.text
    with db_sessions() as s:
        after = s.scalar(select(func.count()).select_from(Interaction).where(
            Interaction.tenant_id == tenant))
    assert after == before  # nothing was answered, so nothing half-stored

    # A valid surrogate pair is one character (an emoji), not an error.
    r = _post(client, "/v1/chat/completions", key,
              ('{"model": "%s", "max_tokens": 2, "user": "\\ud83d\\ude00", '
               '"messages": [{"role": "user", "content": "hi"}]}' % alias).encode())
    assert r.status_code == 200, r.text


def test_a_nul_in_a_json_key_is_stored_like_a_nul_in_a_value(client, make_key, make_alias, tenant,
                                                            db_sessions):
    key, alias = make_key(tenant, "product"), make_alias(tenant)
    body = ('{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", "content": "hi", '
            '"na\\u0000me": "v\\u0000"}]}' % alias).encode()
    r = _post(client, "/v1/chat/completions", key, body)
    assert r.status_code == 200, r.text
    iid = r.headers["x-interaction-id"]
    with db_sessions() as s:
        row = s.get(Interaction, uuid.UUID(iid))
        assert row is not None, "answered but never stored"
        assert row.messages[0]["na\ufffdme"] == "v\ufffd"


def test_one_tenants_bad_ratings_do_not_fail_another_tenants_batch(api, make_key, make_alias,
                                                                   db_sessions):
    good_t, bad_t = f"t-{uuid.uuid4().hex[:10]}", f"t-{uuid.uuid4().hex[:10]}"
    good_key, bad_key = make_key(good_t, "product"), make_key(bad_t, "product")
    good_ids = seed_interactions(db_sessions, good_t, make_alias(good_t),
                                 api_key_id(db_sessions, good_key), 60)
    bad_ids = seed_interactions(db_sessions, bad_t, make_alias(bad_t),
                                api_key_id(db_sessions, bad_key), 12)

    async def burst():
        async with httpx.AsyncClient(base_url=api.url, timeout=60) as c:
            good = [c.post("/v1/feedback", headers=bearer(good_key),
                           json={"interaction_id": i, "rating": "up", "rater_id": f"u{n}"})
                    for n, i in enumerate(good_ids)]
            bad = [c.post("/v1/feedback", content=_raw(
                '{"interaction_id": "%s", "rating": "down", "rater_id": "x{LONE}"}' % i),
                headers={**bearer(bad_key), "content-type": "application/json"})
                for i in bad_ids]
            mixed = [x for pair in zip(good[:12], bad, strict=True) for x in pair] + good[12:]
            return await asyncio.gather(*mixed)

    replies = asyncio.run(burst())
    codes = [r.status_code for r in replies]
    assert codes.count(201) == 60 and codes.count(422) == 12, codes
    with db_sessions() as s:
        stored = s.scalar(select(func.count()).select_from(Feedback).where(
            Feedback.interaction_id.in_([uuid.UUID(i) for i in good_ids])))
    assert stored == 60


@pytest.fixture(scope="module")
def limited_api(api_settings, stack_root):
    with api_with(api_settings, stack_root / "api-collide.log", feedback_rate_per_rater="2") as proc:
        yield proc


def test_rate_limit_keys_do_not_collide_whatever_the_ids_contain(limited_api, make_key,
                                                                  make_alias, db_sessions):
    # Tenant "X" rating as rater "x:v" once shared a key with tenant "X:x" as rater "v".
    x = f"t-{uuid.uuid4().hex[:8]}"
    pairs = [(x, "x:v"), (f"{x}:x", "v")]
    keys = {t: make_key(t, "product") for t, _ in pairs}
    ids = {t: seed_interactions(db_sessions, t, make_alias(t), api_key_id(db_sessions, keys[t]), 3)
           for t, _ in pairs}
    with httpx.Client(base_url=limited_api.url, timeout=30) as c:
        def post(t, rater, n):
            return c.post("/v1/feedback", headers=bearer(keys[t]),
                          json={"interaction_id": ids[t][n], "rating": "up", "rater_id": rater})

        (t1, r1), (t2, r2) = pairs
        assert [post(t1, r1, n).status_code for n in range(3)] == [201, 201, 429]
        assert [post(t2, r2, n).status_code for n in range(3)] == [201, 201, 429]
