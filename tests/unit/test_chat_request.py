"""A stored chat request's template arguments, derived the way vLLM 0.32 derives them.

tests/integration/test_train_serve_consistency.py checks the whole against vLLM's /tokenize;
these pin the rules one by one.
"""

from __future__ import annotations

import json

import pytest

from workers.chat_request import (
    UnsupportedRequest,
    template_args,
    template_fields,
    template_messages,
    tool_dicts,
)

WEATHER = {
    # Keys in another order than vLLM's model and no description: vLLM re-orders the tool and
    # function keys and renders the missing description as null; the schema keeps its order.
    "function": {"parameters": {"type": "object", "properties": {"unit": {}, "city": {}}}, "name": "get_weather"},
    "type": "function",
}


def test_a_request_without_template_fields_has_no_arguments() -> None:
    assert template_args({}) == {} == template_args(None)
    assert template_args({"temperature": 0.2, "max_tokens": 9, "tool_choice": "none"}) == {}


def test_tools_are_shaped_like_vllms_tool_model() -> None:
    (tool,) = tool_dicts([WEATHER])
    assert json.dumps(tool) == json.dumps({
        "type": "function",
        "function": {"name": "get_weather", "description": None,
                     "parameters": {"type": "object", "properties": {"unit": {}, "city": {}}}},
    })
    strict = {**WEATHER, "function": {**WEATHER["function"], "strict": True}, "defer_loading": True}
    (tool,) = tool_dicts([strict])
    assert tool["function"]["strict"] is True
    # The tool's defer_loading is copied into its function, and both are kept.
    assert tool["defer_loading"] is True and tool["function"]["defer_loading"] is True
    assert template_args({"tools": [WEATHER]}) == {"tools": tool_dicts([WEATHER])}


@pytest.mark.parametrize("tools", [[], "get_weather", [{"type": "function"}],
                                   [{"type": "code_interpreter", "function": {"name": "x"}}], [3]])
def test_tools_vllm_refuses_are_refused(tools) -> None:
    with pytest.raises(UnsupportedRequest):
        template_args({"tools": tools})


def test_chat_template_kwargs_reach_the_template_as_vllm_merges_them() -> None:
    kwargs = {"enable_thinking": False, "persona": {"name": "Ada", "tags": ["a", 1, None]},
              # vLLM drops unset values and sets the generation flags from the request itself.
              "skip": None, "mode": "auto", "add_generation_prompt": False, "tokenize": True}
    assert template_args({"chat_template_kwargs": kwargs}) == {
        "enable_thinking": False, "persona": {"name": "Ada", "tags": ["a", 1, None]}}


@pytest.mark.parametrize("kwargs", [
    {"chat_template": "{{ messages }}"}, {"tools": []}, {"conversation": []},
    {"when": object()}, {"nested": {1: "not a JSON key"}}, ["enable_thinking"],
])
def test_chat_template_kwargs_training_cannot_repeat_are_refused(kwargs) -> None:
    with pytest.raises(UnsupportedRequest):
        template_args({"chat_template_kwargs": kwargs})


def test_documents_and_reasoning_effort_are_request_fields_vllm_passes_on() -> None:
    docs = [{"title": "FAQ", "text": "Returns take 14 days."}]
    assert template_args({"documents": docs, "reasoning_effort": "low"}) == {
        "documents": docs, "reasoning_effort": "low", "enable_thinking": True}
    assert template_args({"reasoning_effort": "none"})["enable_thinking"] is False
    # A kwarg the request set itself wins over the one reasoning_effort implies.
    assert template_args({"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}}
                         )["enable_thinking"] is False


@pytest.mark.parametrize("params", [
    {"chat_template": "{{ messages }}"}, {"continue_final_message": True},
    {"add_generation_prompt": False},
])
def test_requests_rendered_another_way_are_refused(params) -> None:
    with pytest.raises(UnsupportedRequest):
        template_args(params)


def test_template_fields_keep_what_the_template_or_a_replay_needs() -> None:
    params = {"tools": [WEATHER], "tool_choice": "none", "chat_template_kwargs": {"a": 1},
              "temperature": 0.1, "user": "u", "documents": None}
    assert template_fields(params) == {"tools": [WEATHER], "tool_choice": "none",
                                       "chat_template_kwargs": {"a": 1}}


def test_tool_call_arguments_reach_the_template_parsed() -> None:
    calls = [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"city": "Oslo", "n": 2}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": ""}},
        {"id": "c", "type": "function", "function": {"name": "h", "arguments": "{not json"}},
        {"id": "d", "type": "function", "function": {"name": "i", "arguments": "[1, 2]"}},
    ]
    stored = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": calls},
              {"role": "assistant", "content": "x", "tool_calls": [], "reasoning": "think"}]
    out = template_messages(stored)
    assert [c["function"]["arguments"] for c in out[1]["tool_calls"]] == [{"city": "Oslo", "n": 2}, {}, {}, {}]
    assert list(out[1]["tool_calls"][0]["function"]["arguments"]) == ["city", "n"]  # order kept
    assert "tool_calls" not in out[2]  # vLLM drops an empty list
    assert out[2]["reasoning"] == out[2]["reasoning_content"] == "think"
    assert stored[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo", "n": 2}'  # not mutated
