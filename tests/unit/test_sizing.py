"""Engine sizing rules: --max-loras / --max-cpu-loras against the aliases served."""

from __future__ import annotations

import pytest

from service.engine.sizing import Demand, EngineSize, EngineTooSmall, check, problems


def test_demand_counts_live_warm_and_staged_per_alias():
    d = Demand(aliases=3, canaries=1)
    assert d.held == 9  # live + warm previous + staged/canary, per alias
    assert d.served_at_once == 4  # every live version plus the canary


def test_default_engine_fits_two_aliases_not_three():
    size = EngineSize(max_loras=4, max_cpu_loras=8)
    check(size, Demand(2, 1))
    with pytest.raises(EngineTooSmall) as info:
        check(size, Demand(3))
    msg = str(info.value)
    assert "--max-cpu-loras 8 < 9 needed: 3 aliases x 3" in msg
    assert "--max-cpu-loras >= 9" in msg and "FLYWHEEL_VLLM_MAX_CPU_LORAS" in msg


def test_too_few_batch_slots_for_live_plus_canaries():
    found = problems(EngineSize(max_loras=2, max_cpu_loras=16), Demand(2, 1))
    assert found == ["--max-loras 2 < 3 needed: 2 live aliases + 1 canaries served at once"]


def test_cpu_cache_below_batch_slots_is_refused():
    found = problems(EngineSize(max_loras=8, max_cpu_loras=4), Demand(0))
    assert len(found) == 1 and "vLLM requires max_cpu_loras >= max_loras" in found[0]


def test_nothing_served_needs_nothing():
    assert problems(EngineSize(1, 1), Demand(0)) == []


def test_every_problem_is_reported_at_once():
    with pytest.raises(EngineTooSmall) as info:
        check(EngineSize(max_loras=1, max_cpu_loras=1), Demand(4, 2))
    msg = str(info.value)
    assert "--max-cpu-loras 1 < 12" in msg and "--max-loras 1 < 6" in msg
    assert "--max-loras >= 6 and --max-cpu-loras >= 12" in msg
