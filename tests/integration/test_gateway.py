"""The gateway through real vLLM, with the official openai SDK as the client."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from sqlalchemy import text

from tests.helpers.auth import METRICS_AUTH, bearer

pytestmark = pytest.mark.vllm

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello to the support team."}]


@pytest.fixture()
def product(make_key, make_alias, tenant):
    key = make_key(tenant, "product")
    alias = make_alias(tenant)
    return key, alias


def sdk(api, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_non_streaming_chat_is_served_and_stored(api, client, product):
    key, alias = product
    raw = sdk(api, key).chat.completions.with_raw_response.create(
        model=alias, messages=MESSAGES, max_tokens=8, temperature=0, user="u-1")
    completion = raw.parse()
    iid = raw.headers["x-interaction-id"]
    assert completion.model_extra["interaction_id"] == iid
    assert completion.model == alias
    text = completion.choices[0].message.content
    assert isinstance(text, str) and completion.usage.completion_tokens >= 1

    stored = client.get(f"/v1/interactions/{iid}", headers=bearer(key)).json()
    assert stored["alias"] == alias and stored["served_model"] == "base"
    assert stored["response_text"] == text
    assert stored["messages"] == MESSAGES
    assert stored["params"]["max_tokens"] == 8 and stored["user"] == "u-1"
    assert stored["prompt_tokens"] == completion.usage.prompt_tokens
    assert stored["completion_tokens"] == completion.usage.completion_tokens
    assert stored["finish_reason"] == completion.choices[0].finish_reason
    assert stored["latency_ms"] > 0 and stored["stream"] is False


def test_streaming_chat_tags_first_chunk_and_stores_the_text(api, client, product):
    key, alias = product
    stream = sdk(api, key).chat.completions.create(
        model=alias, messages=MESSAGES, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks, "no chunks streamed"
    iid = chunks[0].model_extra.get("interaction_id")
    assert iid, "first chunk must carry interaction_id"
    assert all("interaction_id" not in c.model_extra for c in chunks[1:])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # The client did not ask for usage, so the usage-only chunk the gateway requested is hidden.
    assert all(c.choices for c in chunks)

    stored = client.get(f"/v1/interactions/{iid}", headers=bearer(key)).json()
    assert stored["response_text"] == text
    assert stored["stream"] is True and stored["completion_tokens"] >= 1
    assert stored["ttft_ms"] is not None and stored["ttft_ms"] <= stored["latency_ms"]


def test_streaming_with_usage_requested_passes_usage_through(api, product):
    key, alias = product
    chunks = list(sdk(api, key).chat.completions.create(
        model=alias, messages=MESSAGES, max_tokens=5, stream=True,
        stream_options={"include_usage": True}))
    usage = [c.usage for c in chunks if c.usage]
    assert usage and usage[-1].completion_tokens >= 1


def test_base_model_name_routes_to_base(api, product):
    key, _ = product
    completion = sdk(api, key).chat.completions.create(model="base", messages=MESSAGES, max_tokens=4)
    assert completion.model == "base" and completion.model_extra["interaction_id"]


def test_models_lists_base_and_own_aliases_only(api, make_key, make_alias, tenant, product):
    key, alias = product
    other_alias = make_alias(f"{tenant}-other")
    ids = {m.id for m in sdk(api, key).models.list()}
    assert {"base", alias} <= ids
    assert other_alias not in ids


def test_unknown_alias_is_404_naming_model(client, product):
    key, _ = product
    r = client.post("/v1/chat/completions", headers=bearer(key),
                    json={"model": "no-such-bot", "messages": MESSAGES})
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "model"


def test_upstream_validation_error_passes_through(client, product):
    key, alias = product
    # Far beyond the engine's 256-token context: vLLM refuses with 400, the gateway relays it.
    r = client.post("/v1/chat/completions", headers=bearer(key),
                    json={"model": alias, "messages": MESSAGES, "max_tokens": 100000})
    assert r.status_code == 400
    assert "error" in r.json()


def test_metrics_count_gateway_traffic(client, product, api):
    key, alias = product
    r = client.post("/v1/chat/completions", headers=bearer(key),
                    json={"model": alias, "messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200
    text = httpx.get(f"{api.url}/metrics", headers=METRICS_AUTH).text
    assert f'flywheel_interactions_total{{alias="{alias}"}} 1.0' in text
    assert f'flywheel_gateway_latency_seconds_count{{alias="{alias}",version="base"}} 1.0' in text
    assert 'flywheel_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text


def test_readyz_reports_all_services(client):
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"database": "ok", "broker": "ok", "engine": "ok"}


def _row(db_sessions, iid: str):
    with db_sessions() as s:
        return s.execute(text("SELECT finish_reason, response_text FROM interactions WHERE id = :i"),
                         {"i": iid}).first()


def test_interaction_is_stored_while_it_is_generated(api, db_sessions, product):
    """The request's row exists (pending) before the answer is done; the answer fills it."""
    key, alias = product
    body = {"model": alias, "messages": MESSAGES, "max_tokens": 200, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=api.url, timeout=60) as c, \
            c.stream("POST", "/v1/chat/completions", headers=bearer(key), json=body) as r:
        iid = r.headers["x-interaction-id"]
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        deadline = time.monotonic() + 2
        while (row := _row(db_sessions, iid)) is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert row is not None and row.finish_reason == "pending" and row.response_text == ""
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    row = _row(db_sessions, iid)
    assert row.finish_reason == "length" and row.response_text


def test_a_request_the_engine_refuses_leaves_no_row(client, db_sessions, product):
    key, alias = product
    r = client.post("/v1/chat/completions", headers=bearer(key),
                    json={"model": alias, "messages": MESSAGES, "max_tokens": 4, "min_tokens": 50})
    assert r.status_code == 400, r.text  # vLLM's own validation, relayed
    iid = r.headers["x-interaction-id"]
    # The pending row is removed in the background: seconds on a loaded 2-core machine.
    deadline = time.monotonic() + 20
    while _row(db_sessions, iid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _row(db_sessions, iid) is None
