"""Tool use through the gateway and real vLLM: the request is stored as the product sent it.

The tiny model's template ignores tools and cannot produce a tool call, so this proves what is
stored from the request; tests/unit/test_gateway_capture.py proves the capture of an answer's
tool calls on vLLM's own response shapes, and test_train_serve_consistency.py the rendering.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.auth import bearer

pytestmark = pytest.mark.vllm

# Key orders a JSONB column would not keep (it puts shorter keys first).
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather now.",
    "parameters": {"type": "object", "properties": {"unit": {"type": "string"}, "city": {"type": "string"}},
                   "required": ["city"]}}}]
CALL = {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "user", "content": "And tomorrow?"}]


@pytest.fixture()
def stored(client, make_key, make_alias, tenant) -> dict:
    """One chat with tools and template kwargs, read back through GET /v1/interactions/{id}."""
    key, alias = make_key(tenant, "product"), make_alias(tenant)
    # vLLM without a tool parser serves tools only with tool_choice "none" (still rendered).
    r = client.post("/v1/chat/completions", headers=bearer(key), json={
        "model": alias, "messages": MESSAGES, "tools": TOOLS, "tool_choice": "none",
        "chat_template_kwargs": {"enable_thinking": False}, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    got = client.get(f"/v1/interactions/{r.json()['interaction_id']}", headers=bearer(key))
    assert got.status_code == 200, got.text
    return got.json()


def test_tools_and_template_kwargs_are_stored_with_the_conversation(stored):
    assert stored["params"]["tools"] == TOOLS
    assert stored["params"]["tool_choice"] == "none"
    assert stored["params"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert stored["messages"][2] == {"role": "assistant", "tool_calls": [CALL]}
    assert stored["response_tool_calls"] is None  # the tiny model answered in text
    assert stored["finish_reason"] in ("stop", "length")


def test_tools_are_stored_in_the_order_they_were_sent(stored):
    # interactions.params is json (migration 0008): jsonb would put "city" before "unit".
    assert json.dumps(stored["params"]["tools"]) == json.dumps(TOOLS)
