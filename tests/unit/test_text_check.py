"""service.api.text_check: where a body's text stops being Unicode, or that it does not."""

from __future__ import annotations

import json

from service.api.text_check import invalid_text
from service.intake.ratelimit import key_part


def test_a_lone_surrogate_is_found_with_the_path_to_its_field():
    body = b'{"messages": [{"role": "user", "content": "ok"}, {"content": "a\\udc00b"}]}'
    field, reason = invalid_text(body)
    assert field == "messages.1.content"
    assert "U+DC00" in reason and "character 1" in reason


def test_a_bad_key_is_named_with_its_bad_half_replaced():
    field, reason = invalid_text(b'{"meta": {"k\\ud800": 1}}')
    assert field == "meta.k?" and reason.startswith("a key is not valid Unicode")


def test_valid_text_passes_including_surrogate_pairs_and_other_escapes():
    for body in (b'{"a": "\\ud83d\\ude00 \\u00e9 plain"}', b'{"a": [1, 2.5, null, true]}',
                 json.dumps({"a": "\u00e9\U0001f600"}, ensure_ascii=False).encode(),
                 b'not json \\ud800', b''):
        assert invalid_text(body) is None, body


def test_rate_limit_key_parts_never_collide_and_always_encode():
    assert key_part("X", "x:v") != key_part("X:x", "v")
    assert key_part("ab", "c") != key_part("a", "bc")
    assert len(key_part("t", "\ud800")) == 32  # a lone surrogate cannot fail the batch
    assert key_part("t", "r") == key_part("t", "r")

