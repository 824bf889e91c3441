"""Schemathesis against the API's own OpenAPI spec, with keys of both roles, fixed seed.

Asserts what a client can rely on: no 5xx for any generated request, and every documented
response matches its schema. At least 1000 generated cases run in CI. (Schemathesis' strategies
are driven directly: its lazy pytest plugin does not load under this pytest.)
"""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

pytestmark = pytest.mark.vllm

EXAMPLES_PER_OPERATION = 45


@pytest.fixture(scope="module")
def keys(make_key, make_alias):
    make_alias("fuzz", "fuzz-bot")
    return {"product": make_key("fuzz", "product"), "ops": make_key("fuzz", "ops")}


def fuzz(api_url: str, key: str) -> dict[str, int]:
    """Run every operation's generated cases; returns cases per operation."""
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    counts: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"

        @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, deadline=None,
                             database=None, suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=operation.as_strategy())
        def run(case) -> None:
            counts[label] = counts.get(label, 0) + 1  # noqa: B023 - run() is called in this iteration
            case.call_and_validate(base_url=api_url, headers={"Authorization": f"Bearer {key}"},
                                   checks=[not_a_server_error, response_schema_conformance],
                                   timeout=60)

        run()
    return counts


def test_fuzzing_both_roles_finds_no_5xx_and_no_schema_violation(api, keys):
    total = 0
    for role in ("product", "ops"):
        counts = fuzz(api.url, keys[role])
        assert len(counts) >= 10, counts  # every operation of the spec was exercised
        total += sum(counts.values())
    assert total >= 1000, total
