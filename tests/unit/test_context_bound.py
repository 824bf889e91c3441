"""The gateway's cheap bound on a prompt's tokens, and its error text."""

from __future__ import annotations

from service.api.context_window import ContextTooLong, byte_bound, completion_budget


def test_the_byte_bound_covers_the_messages_and_the_templates_text():
    one = byte_bound({"messages": [{"role": "user", "content": "héllo"}]})
    two = byte_bound({"messages": [{"role": "user", "content": "héllo"},
                                   {"role": "assistant", "content": "hi"}]})
    assert one > len("héllo".encode()) + 1000 and two > one
    # Text a template renders from arguments (tools, kwargs) is not bounded by the messages.
    assert byte_bound({"messages": [], "tools": [{"type": "function"}]}) is None
    assert byte_bound({"messages": [], "chat_template_kwargs": {"x": 1}}) is None


def test_the_completion_budget_prefers_max_completion_tokens():
    assert completion_budget({"max_tokens": 5}) == 5
    assert completion_budget({"max_tokens": 5, "max_completion_tokens": 7}) == 7
    assert completion_budget({}) == 0


def test_the_error_names_the_limit_and_both_counts():
    msg = ContextTooLong(limit=2048, prompt_tokens=2000, completion_tokens=100).message()
    assert "maximum context length is 2048 tokens" in msg
    assert "requested 2100 tokens (2000 in the messages and 100 for the completion)" in msg
    assert "(3000 in the messages)" in ContextTooLong(2048, 3000, 0).message()
