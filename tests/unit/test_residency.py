"""The residency bound: which of an alias's resident versions go first, and where the bound is
set (the alias's policy, never above what the engine's sizing counts)."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest

from service.domain.policy import Policy, PolicyError, PolicyStore
from service.engine import sizing
from service.engine.residency import MAX_RESIDENT_VERSIONS, Resident, beyond_bound, resident, role_of

ADAPTER = uuid.uuid4()


def version(number: int, role: str, *, in_run: bool = False, drained: bool = False) -> Resident:
    spare = role == "staged" or (role == "warm" and drained)
    return Resident(uuid.uuid4(), ADAPTER, "acme", "bot", f"acme--bot--v{number}", number,
                    "live" if role == "live" else "staged" if role == "canary" else role,
                    role, protected=not spare or in_run)


def test_the_oldest_staged_versions_go_first_until_the_bound_holds():
    live, warm = version(4, "live"), version(3, "warm")
    staged = [version(5, "staged"), version(6, "staged"), version(7, "staged")]
    gone = beyond_bound([live, warm, *staged], bound=3)
    assert [v.number for v in gone] == [5, 6]
    assert beyond_bound([live, warm, *staged], bound=5) == []


def test_live_canary_warm_and_a_candidate_in_use_stay_even_past_the_bound():
    kept = [version(1, "warm"), version(2, "warm"), version(3, "live"), version(4, "canary"),
            version(5, "staged", in_run=True)]
    assert beyond_bound(kept, bound=1) == []
    extra = version(6, "staged")
    assert beyond_bound([*kept, extra], bound=1) == [extra]


def test_roles_come_from_the_alias_first_then_the_status():
    v, other = uuid.uuid4(), uuid.uuid4()
    assert role_of(v, "live", serving=v, canary=None) == "live"
    assert role_of(v, "staged", serving=other, canary=v) == "canary"
    assert role_of(v, "warm", serving=other, canary=None) == "warm"
    assert role_of(v, "candidate", serving=other, canary=None) == "candidate"


def test_the_policy_bound_defaults_to_what_sizing_counts_and_can_only_lower_it(tmp_path):
    assert Policy().serving.max_resident_versions == MAX_RESIDENT_VERSIONS
    assert sizing.VERSIONS_HELD_PER_ALIAS == MAX_RESIDENT_VERSIONS
    (tmp_path / "default.yaml").write_text("approval: manual\n")
    (tmp_path / "acme--bot.yaml").write_text("serving: {max_resident_versions: 1}\n")
    store = PolicyStore(tmp_path)
    assert store.max_resident_versions("acme", "bot") == 1
    assert store.max_resident_versions("globex", "bot") == MAX_RESIDENT_VERSIONS
    for bad in (0, MAX_RESIDENT_VERSIONS + 1):
        (tmp_path / "acme--bot.yaml").write_text(f"serving: {{max_resident_versions: {bad}}}\n")
        with pytest.raises(PolicyError, match="serving.max_resident_versions"):
            PolicyStore(tmp_path)


def test_a_drained_warm_version_goes_past_the_bound_and_is_retired_a_draining_one_stays():
    live, warm = version(3, "live"), version(2, "warm", drained=True)
    assert beyond_bound([warm, live], bound=1) == [warm]
    assert warm.evicted_status == "retired" and version(4, "staged").evicted_status == "candidate"
    draining = version(2, "warm", drained=False)
    assert beyond_bound([draining, live], bound=1) == []


def test_the_row_reader_protects_warm_versions_until_the_alias_has_drained():
    v, live = uuid.uuid4(), uuid.uuid4()
    row = SimpleNamespace(id=v, adapter_id=ADAPTER, tenant_id="acme", alias="bot", lora_name="x",
                          number=1, status="warm", serving_version_id=live, canary_version_id=None)
    assert resident(row, in_run=False).protected
    assert not resident(row, in_run=False, drained=True).protected
    assert resident(row, in_run=True, drained=True).protected
