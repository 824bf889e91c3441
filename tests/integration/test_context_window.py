"""A request longer than the engine's context gets a 400 from the gateway in OpenAI's envelope,
naming the limit and the count, before vLLM is asked to generate (the session's tiny engine
serves a 256-token context)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.helpers.auth import bearer
from tests.helpers.metrics import sample

pytestmark = pytest.mark.vllm


@pytest.fixture()
def product(make_key, make_alias, tenant):
    return make_key(tenant, "product"), make_alias(tenant)


def _engine_requests(vllm) -> float:
    text = httpx.get(f"{vllm.url}/metrics", timeout=10).text
    return sum(sample(text, "vllm:request_success_total", finished_reason=r) or 0.0
               for r in ("stop", "length", "abort", "error"))


def _wait_context_known(client, key, alias) -> None:
    # The observer reads each replica's context within a second of the API starting.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = client.post("/v1/chat/completions", headers=bearer(key), json={
            "model": alias, "max_tokens": 1, "messages": [{"role": "user", "content": "x " * 300}]})
        if r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded":
            return
        time.sleep(0.3)
    raise AssertionError("the gateway never learnt the engine's context")


def test_a_prompt_over_the_context_is_refused_before_generation(api, client, vllm, product):
    key, alias = product
    _wait_context_known(client, key, alias)
    before = _engine_requests(vllm)
    r = client.post("/v1/chat/completions", headers=bearer(key), json={
        "model": alias, "messages": [{"role": "user", "content": "hello there " * 200}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert error["type"] == "invalid_request_error"
    assert "maximum context length is 256 tokens" in error["message"]
    count = int(error["message"].split("requested ")[1].split(" tokens")[0])
    assert count > 256
    assert "x-interaction-id" not in r.headers  # nothing was served, nothing is stored
    assert _engine_requests(vllm) == before, "vLLM generated for a refused request"


def test_max_tokens_that_do_not_fit_beside_the_prompt_are_refused(client, product):
    key, alias = product
    _wait_context_known(client, key, alias)
    r = client.post("/v1/chat/completions", headers=bearer(key), json={
        "model": alias, "max_tokens": 250, "messages": [{"role": "user", "content": "word " * 30}]})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "250 for the completion" in message and "256" in message


def test_the_sdk_shows_the_limit_and_a_request_that_fits_is_served(api, client, product):
    key, alias = product
    _wait_context_known(client, key, alias)
    sdk = openai.OpenAI(base_url=f"{api.url}/v1", api_key=key, max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
        sdk.chat.completions.create(model=alias, messages=[{"role": "user", "content": "a b " * 200}])
    # Close to the limit but inside it: the exact count (vLLM's /tokenize) lets it through.
    ok = sdk.chat.completions.create(model=alias, max_tokens=4, temperature=0,
                                     messages=[{"role": "user", "content": "ab " * 60}])
    assert ok.choices[0].message.content is not None
