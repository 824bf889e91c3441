"""The run writer's SET clauses: only the table's own columns become SQL; JSON parts merge."""

from __future__ import annotations

import pytest

from service.domain import runs


def test_an_unknown_field_is_refused_before_any_sql():
    with pytest.raises(ValueError, match="no column 'state; DROP TABLE x'"):
        runs.update(None, None, **{"state; DROP TABLE x": 1})  # type: ignore[arg-type]


def test_merged_json_parts_merge_and_other_columns_are_set():
    params: dict = {}
    sets = runs._assignments({"metrics": {"a": 1}, "dataset_stats": {"n": 2}, "method": "sft"}, params)
    assert sets[0].startswith("metrics = coalesce(metrics")
    assert sets[1] == "dataset_stats = CAST(:dataset_stats AS jsonb)"
    assert sets[2] == "method = :method"
    assert params == {"metrics": '{"a": 1}', "dataset_stats": '{"n": 2}', "method": "sft"}
